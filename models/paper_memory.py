"""Naive Titans memory: a literal, token-by-token translation of the paper's equations (arXiv 2501.00663, §3.1).

The test oracle for ``neural_memory.py`` (and a readable reference). One loop over tokens; the gradient of the
associative loss comes from ``torch.autograd.grad``, not from a hand-written backward. For each token t:

    k_t = l2norm(silu(W_K x_t)),  v_t = W_V x_t,  q_t = l2norm(silu(W_Q x_t))
    y_t = out_proj(M_{t-1}(q_t))                                  read before writing
    theta_t, eta_t, alpha_t = max_lr*sigmoid(.), sigmoid(.), sigmoid(.)   of  gate_weight x_t + gate_bias
    S_t = eta_t S_{t-1} - theta_t grad_M ||M_{t-1}(k_t) - v_t||^2
    M_t = (1 - alpha_t) M_{t-1} + S_t

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
    ):
        super().__init__()
        memory_dim = memory_dim or dim
        hidden = max(1, int(round(memory_dim * expansion)))
        self.max_lr = max_lr
        self.to_keys = nn.Linear(dim, memory_dim, bias=False)
        self.to_values = nn.Linear(dim, memory_dim, bias=False)
        self.to_queries = nn.Linear(dim, memory_dim, bias=False)
        self.gate_weight = nn.Parameter(torch.zeros(3, dim))  # rows: theta, eta, alpha
        self.gate_bias = nn.Parameter(torch.zeros(3))
        dims = [memory_dim] + [hidden] * (depth - 1) + [memory_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i) / i**0.5) for i, o in zip(dims[:-1], dims[1:])]
        )
        self.out_proj = nn.Linear(memory_dim, dim, bias=False)

    @staticmethod
    def memory(weights, x: Tensor) -> Tensor:
        """M(x) = W_L silu(... silu(W_1 x)); weights (B, out, in), x (B, in)."""
        for i, w in enumerate(weights):
            if i:
                x = F.silu(x)
            x = (w @ x.unsqueeze(-1)).squeeze(-1)
        return x

    def forward(self, x: Tensor, queries: Tensor | None = None, weights=None, momentum=None):
        """x, queries: (B, T, D). Returns (read-outs (B, T, D), final weights, final momentum)."""
        queries = x if queries is None else queries
        B, T, _ = x.shape
        if weights is None:
            weights = [w.unsqueeze(0).expand(B, -1, -1) for w in self.initial_weights]
        if momentum is None:
            momentum = [torch.zeros_like(w) for w in weights]
        differentiable = torch.is_grad_enabled()
        ys = []
        for t in range(T):
            xt = x[:, t]
            k = F.normalize(F.silu(self.to_keys(xt)), dim=-1, eps=1e-12)
            v = self.to_values(xt)
            q = F.normalize(F.silu(self.to_queries(queries[:, t])), dim=-1, eps=1e-12)
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
            momentum = [eta * s - theta * gr for s, gr in zip(momentum, grads)]
            weights = [(1 - alpha) * w + s for w, s in zip(weights, momentum)]
        return torch.stack(ys, dim=1), weights, momentum
