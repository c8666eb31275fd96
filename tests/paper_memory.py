"""Naive Titans memory: a literal, token-by-token translation of the paper's equations (arXiv 2501.00663,
§3.1).

The test oracle for ``neural_memory.py`` (and a readable reference). One loop over tokens; the gradient of the
associative loss comes from ``torch.autograd.grad``, not from a hand-written backward. For each token t and
each head (the key/value/query features are split into ``heads`` groups, each with its own memory MLP):

    x'_t = x_t - c (c = input_centre with centre_inputs; queries minus query_centre; the gates read x_t)
    k_t = l2norm(silu(W_K x'_t)),  v_t = W_V x'_t (silu(.) with value_activation),  q_t = l2norm(silu(W_Q
    x'_t)) y_t = out_proj(M_{t-1}(q_t))                                  read before writing
    theta_t, eta_t, alpha_t = max_lr*sigmoid(.), sigmoid(.), sigmoid(.)   of  gate_weight x_t + gate_bias
    g_t = theta_t grad_M ||M_{t-1}(k_t) - v_t||^2,  scaled per layer to norm <= update_bound if set
    S_t = eta_t S_{t-1} - g_t
    M_t = (1 - alpha_t) M_{t-1} + S_t            (M_t = M_0 + (1 - alpha_t)(M_{t-1} - M_0) + S_t toward init)

Parameter names and shapes equal ``NeuralMemory``'s, so ``paper.load_state_dict(fast.state_dict())`` works;
with ``chunk_size=1`` the two must agree. Imports only torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PaperMemory(nn.Module):
    def __init__(
        self,
        dim: int,
        memory_dim: int | None = None,
        depth: int = 2,
        expansion: float = 2,
        max_lr: float = 1.0,
        heads: int = 1,
        update_bound: float | None = None,
        forget_toward_init: bool = False,
        value_activation: bool = False,
        centre_inputs: bool = False,
    ):
        super().__init__()
        memory_dim = memory_dim or dim
        head_dim = memory_dim // heads
        hidden = max(1, int(round(head_dim * expansion)))
        self.max_lr, self.heads, self.update_bound = max_lr, heads, update_bound
        self.forget_toward_init, self.value_activation = forget_toward_init, value_activation
        self.to_keys = nn.Linear(dim, memory_dim, bias=False)
        self.to_values = nn.Linear(dim, memory_dim, bias=False)
        self.to_queries = nn.Linear(dim, memory_dim, bias=False)
        self.gate_weight = nn.Parameter(torch.zeros(3, dim))  # rows: theta, eta, alpha
        self.gate_bias = nn.Parameter(torch.zeros(3))
        dims = [head_dim] + [hidden] * (depth - 1) + [head_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(heads * o, i) / i**0.5) for i, o in zip(dims[:-1], dims[1:])]
        )
        self.out_proj = nn.Linear(memory_dim, dim, bias=False)
        self.input_centre = nn.Parameter(torch.zeros(dim)) if centre_inputs else None
        self.query_centre = nn.Parameter(torch.zeros(dim)) if centre_inputs else None

    def memory(self, weights, x: Tensor) -> Tensor:
        """M(x) = W_L silu(... silu(W_1 x)) per head; weights (B, heads * out, in), x (B, heads * d)."""
        B = x.shape[0]
        x = x.view(B, self.heads, -1)
        for i, w in enumerate(weights):
            if i:
                x = F.silu(x)
            x = torch.einsum("bhoi,bhi->bho", w.view(B, self.heads, -1, w.shape[-1]), x)
        return x.reshape(B, -1)

    def heads_l2norm(self, x: Tensor) -> Tensor:
        return F.normalize(x.view(x.shape[0], self.heads, -1), dim=-1, eps=1e-12).reshape(x.shape[0], -1)

    def forward(self, x: Tensor, queries: Tensor | None = None, weights=None, momentum=None):
        """x, queries: (B, T, D). Returns (read-outs (B, T, D), final weights, final momentum)."""
        queries = x if queries is None else queries
        B, T, _ = x.shape
        initial = [w.unsqueeze(0).expand(B, -1, -1) for w in self.initial_weights]
        weights = initial if weights is None else weights
        if momentum is None:
            momentum = [torch.zeros_like(w) for w in weights]
        differentiable = torch.is_grad_enabled()
        ys = []
        for t in range(T):
            xt, qt = x[:, t], queries[:, t]
            if self.input_centre is not None:
                xt_c, qt = xt - self.input_centre, qt - self.query_centre
            else:
                xt_c = xt
            k = self.heads_l2norm(F.silu(self.to_keys(xt_c)))
            v = F.silu(self.to_values(xt_c)) if self.value_activation else self.to_values(xt_c)
            q = self.heads_l2norm(F.silu(self.to_queries(qt)))
            ys.append(self.out_proj(self.memory(weights, q)))
            g = F.linear(xt, self.gate_weight, self.gate_bias)
            theta = (self.max_lr * torch.sigmoid(g[:, 0]))[:, None, None]
            eta = torch.sigmoid(g[:, 1])[:, None, None]
            alpha = torch.sigmoid(g[:, 2])[:, None, None]
            with torch.enable_grad():  # each batch element's loss depends only on its own weights
                at = [
                    w if differentiable and w.requires_grad else w.detach().requires_grad_() for w in weights
                ]
                loss = (self.memory(at, k) - v).pow(2).sum()
                grads = torch.autograd.grad(loss, at, create_graph=differentiable)
            steps = [theta * gr for gr in grads]
            if self.update_bound is not None:  # per layer, per head, per batch element
                steps = [self.bounded(s) for s in steps]
            momentum = [eta * s - st for s, st in zip(momentum, steps)]
            if self.forget_toward_init:
                weights = [w0 + (1 - alpha) * (w - w0) + s for w, w0, s in zip(weights, initial, momentum)]
            else:
                weights = [(1 - alpha) * w + s for w, s in zip(weights, momentum)]
        return torch.stack(ys, dim=1), weights, momentum

    def bounded(self, step: Tensor) -> Tensor:
        B, rows, cols = step.shape
        per_head = step.reshape(B, self.heads, -1)
        scale = (self.update_bound / per_head.norm(dim=-1, keepdim=True)).clamp(max=1.0)
        return (per_head * scale).reshape(B, rows, cols)
