"""Tests of the chunked Titans neural memory (models/neural_memory.py) against independent references:
the token-by-token paper oracle (tests/paper_memory.py, autograd gradients) and a plain loop over chunks
written here (gradient at the chunk-start weights by autograd, then token-by-token momentum and
forgetting)."""

import random

import pytest
import torch
import torch.nn.functional as F
from paper_memory import PaperMemory
from titans_distil.models.neural_memory import MemoryState, NeuralMemory

D, DM = 16, 12  # input width, memory width (different, to catch transposed shapes)
F64 = torch.float64


def make_memory(depth=2, chunk_size=4, dtype=F64, seed=0, **kw) -> NeuralMemory:
    """A memory whose every parameter is perturbed, so gates depend on the data and nothing is symmetric."""
    torch.manual_seed(seed)
    m = NeuralMemory(D, memory_dim=DM, depth=depth, chunk_size=chunk_size, **kw).to(dtype)
    with torch.no_grad():
        m.gate_weight.normal_(0.0, 0.5 * D**-0.5)
        m.gate_bias.add_(0.3 * torch.randn(3, dtype=dtype))
        for w in m.initial_weights:
            w.add_(0.2 * torch.randn_like(w) * w.shape[1] ** -0.5)
        m.to_values.weight.mul_(4.0)
    return m


def rand_x(B=2, T=13, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g, dtype=dtype)


def mlp(weights, x):
    for i, w in enumerate(weights):
        if i:
            x = F.silu(x)
        x = x @ w.transpose(-1, -2)
    return x


def projections(m: NeuralMemory, x):
    k = F.normalize(F.silu(x @ m.to_keys.weight.T), dim=-1)
    v = x @ m.to_values.weight.T
    q = F.normalize(F.silu(x @ m.to_queries.weight.T), dim=-1)
    g = x @ m.gate_weight.T + m.gate_bias
    return k, v, q, g


def chunk_loop_reference(m: NeuralMemory, x, C, differentiable=False):
    """Sequential loop over chunks: read-outs with the chunk-start weights; for a complete chunk, each token's
    gradient at the chunk-start weights (autograd), then momentum and forgetting token by token.
    differentiable=True keeps the graph (create_graph) so parameter gradients can be compared."""
    B, T, _ = x.shape
    W = [w.unsqueeze(0).expand(B, -1, -1) for w in m.initial_weights]
    if not differentiable:
        W = [w.detach().clone() for w in W]
    S = [torch.zeros_like(w) for w in W]
    with torch.set_grad_enabled(differentiable):
        k, v, q, g = projections(m, x)
    theta, eta, alpha = (
        m.max_lr * torch.sigmoid(g[..., 0]),
        torch.sigmoid(g[..., 1]),
        torch.sigmoid(g[..., 2]),
    )
    ys = []
    for s in range(0, T, C):
        e = min(s + C, T)
        ys.append(mlp(W, q[:, s:e]))
        if e - s < C:
            break
        W0 = W if differentiable else [w.detach().requires_grad_() for w in W]
        for j in range(s, e):
            loss = (mlp(W0, k[:, j : j + 1]) - v[:, j : j + 1]).pow(2).sum()
            u = torch.autograd.grad(loss, W0, create_graph=differentiable)
            if m.max_grad_norm is not None:  # per token, per layer (batch rows apart)
                u = [
                    g * (m.max_grad_norm / g.flatten(1).norm(dim=1)).clamp(max=1.0)[:, None, None] for g in u
                ]
            S = [eta[:, j, None, None] * a - theta[:, j, None, None] * b for a, b in zip(S, u)]
            W = [(1 - alpha[:, j, None, None]) * a + b for a, b in zip(W, S)]
    y = torch.cat(ys, 1) @ m.out_proj.weight.T
    return (y, W, S) if differentiable else (y.detach(), W, S)


def ema_reference(m: NeuralMemory, x, C, eps):
    """Token loop of the "ema" rule: W_L <- (1 - r) W_L + r v phi^T / (|phi|^2 + eps), phi at chunk-start
    weights."""
    B, T, _ = x.shape
    W = [w.detach().unsqueeze(0).expand(B, -1, -1).clone() for w in m.initial_weights]
    with torch.no_grad():
        k, v, q, g = projections(m, x)
        r = torch.sigmoid(g[..., 0])
        ys = []
        for s in range(0, T, C):
            e = min(s + C, T)
            ys.append(mlp(W, q[:, s:e]))
            if e - s < C:
                break
            phi = mlp(W[:-1], k[:, s:e])
            phi = F.silu(phi) if len(W) > 1 else phi  # input features of the last layer
            for j in range(e - s):
                assoc = (
                    v[:, s + j, :, None]
                    * phi[:, j, None, :]
                    / (phi[:, j].pow(2).sum(-1)[:, None, None] + eps)
                )
                rj = r[:, s + j, None, None]
                W[-1] = (1 - rj) * W[-1] + rj * assoc
    return torch.cat(ys, 1) @ m.out_proj.weight.T, W


def assert_close(a, b, tol):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- paper oracle (chunk_size = 1)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("dtype,tol", [(F64, 1e-9), (torch.float32, 1e-5)])
def test_chunk1_equals_paper_oracle(depth, dtype, tol):
    m = make_memory(depth, chunk_size=1, dtype=dtype, max_lr=1.0, init_lr=0.1)
    paper = PaperMemory(D, DM, depth=depth, max_lr=1.0).to(dtype)
    paper.load_state_dict(m.state_dict())
    x, qx = rand_x(dtype=dtype), rand_x(dtype=dtype, seed=7)
    with torch.no_grad():
        y, state, _ = m(x, queries=qx)
        y_ref, w_ref, s_ref = paper(x, queries=qx)
    assert y.dtype == dtype and state.weights[0].dtype == dtype
    assert_close(y, y_ref, tol)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, tol)
    assert state.pending.shape == (2, 0, D) and state.position == x.shape[1]


def test_chunk1_meta_gradients_equal_paper_oracle():
    """Gradients through the unrolled updates (the hand-written backward, differentiated by autograd) equal
    the oracle's double backward through torch.autograd.grad(create_graph=True)."""
    m = make_memory(2, chunk_size=1, max_lr=1.0, init_lr=0.1)
    paper = PaperMemory(D, DM, depth=2, max_lr=1.0).to(F64)
    paper.load_state_dict(m.state_dict())
    x = rand_x(T=8)
    probe = torch.randn(2, 8, D, dtype=F64)
    y, state, _ = m(x)
    (y * probe).sum().add(state.weights[0].square().sum()).backward()
    y_ref, w_ref, _ = paper(x)
    (y_ref * probe).sum().add(w_ref[0].square().sum()).backward()
    for (name, a), (_, b) in zip(m.named_parameters(), paper.named_parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert_close(a.grad, b.grad, 1e-8)


# ---------------------------------------------------------------- chunked form


@pytest.mark.parametrize("depth", [1, 2])
def test_clipped_chunked_equals_clipped_sequential_loop(depth):
    m = make_memory(depth, chunk_size=8, max_grad_norm=0.05)
    x = rand_x(T=32)
    with torch.no_grad():
        y, state, stats = m(x)
        unclipped = make_memory(depth, chunk_size=8)(x)[1]
    assert stats["surprise_norm"] > 0.05  # the clip is active
    y_ref, w_ref, s_ref = chunk_loop_reference(m, x, 8)
    assert_close(y, y_ref, 1e-9)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)
    assert not torch.allclose(state.weights[-1], unclipped.weights[-1])


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("C,T", [(4, 32), (8, 32), (16, 48), (4, 37), (8, 37), (16, 37)])
def test_chunked_equals_sequential_chunk_loop(depth, C, T):
    m = make_memory(depth, chunk_size=C)
    x = rand_x(T=T)
    with torch.no_grad():
        y, state, _ = m(x)
    y_ref, w_ref, s_ref = chunk_loop_reference(m, x, C)
    assert_close(y, y_ref, 1e-9)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)
    n_applied = T // C * C
    assert torch.equal(state.pending, x[:, n_applied:])
    assert state.position == T


@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_meta_gradients_equal_sequential_chunk_loop(depth):
    """Parameter gradients through the chunked closed form (log-space coefficients, hand-written backward)
    equal autograd through the plain loop (double backward through torch.autograd.grad)."""
    m = make_memory(depth, chunk_size=4)
    x, probe = rand_x(T=14), torch.randn(2, 14, D, dtype=F64)
    grads = []
    for chunked in (True, False):
        m.zero_grad()
        if chunked:
            y, state, _ = m(x)
            W, S = state.weights, state.momentum
        else:
            y, W, S = chunk_loop_reference(m, x, 4, differentiable=True)
        ((y * probe).sum() + sum(t.square().sum() for t in (*W, *S))).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for name in grads[0]:
        assert_close(grads[0][name], grads[1][name], 1e-8)


def test_extreme_gates_stay_finite_and_exact():
    """eta ~ 1e-12 and 1 - alpha ~ 1e-12: products underflow in float32; the log-space form must not
    divide."""
    m = make_memory(2, chunk_size=16, dtype=torch.float32)
    with torch.no_grad():
        m.gate_bias[1] = -28.0  # eta ~ 7e-13
        m.gate_bias[2] = 28.0  # alpha ~ 1 - 7e-13
    x = rand_x(T=40, dtype=torch.float32)
    with torch.no_grad():
        y, state, _ = m(x)
    assert all(torch.isfinite(t).all() for t in (y, *state.weights, *state.momentum))
    m64 = m.to(F64)
    y_ref, w_ref, s_ref = chunk_loop_reference(m64, x.to(F64), 16)
    assert_close(y.to(F64), y_ref, 1e-4)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a.to(F64), b, 1e-4)


# ---------------------------------------------------------------- streaming and causality


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_streaming_in_random_pieces_equals_at_once(rule):
    m = make_memory(2, chunk_size=5)
    x, qx = rand_x(T=41), rand_x(T=41, seed=3)
    with torch.no_grad():
        y_all, st_all, _ = m(x, update_rule=rule, queries=qx)
        rng = random.Random(0)
        # token by token, then random pieces (including empty ones and ones longer than chunk_size)
        for sizes in ([1] * 41, None):
            if sizes is None:
                sizes, left = [], 41
                while left:
                    sizes.append(min(left, rng.choice([0, 1, 2, 3, 4, 5, 6, 9, 12])))
                    left -= sizes[-1]
            state, ys, pos = None, [], 0
            for n in sizes:
                y, state, _ = m(x[:, pos : pos + n], state, update_rule=rule, queries=qx[:, pos : pos + n])
                ys.append(y)
                pos += n
            assert_close(torch.cat(ys, 1), y_all, 1e-10)
            for a, b in zip(state.weights + state.momentum, st_all.weights + st_all.momentum):
                assert_close(a, b, 1e-10)
            assert torch.equal(state.pending, st_all.pending) and state.position == st_all.position == 41


@pytest.mark.parametrize("C", [1, 4])
def test_causality(C):
    m = make_memory(2, chunk_size=C)
    x = rand_x(T=18)
    with torch.no_grad():
        y, _, _ = m(x)
        for j in (0, 3, 5, 11, 17):
            x2 = x.clone()
            x2[:, j] += 3.0 * torch.randn(2, D, dtype=F64)
            y2, _, _ = m(x2)
            assert torch.equal(y2[:, :j], y[:, :j]), j
            assert not torch.allclose(y2[:, j:], y[:, j:]), j


def test_retrieve_uses_state_weights_only():
    m = make_memory(2, chunk_size=4)
    x = rand_x(T=10)
    with torch.no_grad():
        y, state, _ = m(x)
        assert_close(m.retrieve(m.init_state(2, dtype=F64), x[:, :4]), y[:, :4], 1e-12)
        assert_close(m.retrieve(state, x[:, 8:]), y[:, 8:], 1e-12)  # pending tokens: chunk-start weights


# ---------------------------------------------------------------- update rules


def test_update_rule_none_writes_nothing_but_advances_the_stream():
    m = make_memory(2, chunk_size=4)
    with torch.no_grad():
        _, state, _ = m(rand_x(T=10))  # 2 pending tokens, phase 2
        x = rand_x(T=7, seed=5)
        y, state1, stats = m(x[:, :1], state, update_rule="none")  # stays inside the chunk: nothing applied
        assert (state1.position, state1.phase) == (11, 3) and torch.equal(state1.pending, state.pending)
        for a, b in zip(state1.weights + state1.momentum, state.weights + state.momentum):
            assert torch.equal(a, b)
        assert_close(y, m.retrieve(state, x[:, :1]), 1e-12)
        assert all(float(v) == 0.0 for v in stats.values())
        # 7 tokens cross the chunk boundary after 2: the chunk's 2 written rows are applied there (as a flush
        # would)
        y, state2, stats = m(x, state, update_rule="none")
        flushed = m.flush(state)
        assert (state2.position, state2.phase, state2.pending.shape[1]) == (17, 1, 0)
        for a, b in zip(state2.weights + state2.momentum, flushed.weights + flushed.momentum):
            assert_close(a, b, 1e-12)
        assert_close(y[:, :2], m.retrieve(state, x[:, :2]), 1e-12)  # read with the chunk-start weights
        assert_close(y[:, 2:], m.retrieve(flushed, x[:, 2:]), 1e-12)
        assert float(stats["updated_tokens"]) == 2


def mixed_rule_reference(m: NeuralMemory, x, rules, C):
    """Token-level loop of a stream whose tokens carry their own rule ("surprise" or "none"), as the module
    docstring defines it: chunks are [c C, (c + 1) C) counted from the stream start whatever the rules; every
    token of a chunk is read with the chunk-start weights; a chunk that ends applies its written tokens only
    (gradients at the chunk-start weights, momentum and forgetting token by token over the written tokens);
    the written tokens of the unfinished last chunk stay pending. Returns y, W, S and the pending rows."""
    B, T, _ = x.shape
    W = [w.detach().unsqueeze(0).expand(B, -1, -1).clone() for w in m.initial_weights]
    S = [torch.zeros_like(w) for w in W]
    with torch.no_grad():
        k, v, q, g = projections(m, x)
    theta, eta, alpha = (
        m.max_lr * torch.sigmoid(g[..., 0]),
        torch.sigmoid(g[..., 1]),
        torch.sigmoid(g[..., 2]),
    )
    ys, pending = [], x[:, :0]
    for s in range(0, T, C):
        e = min(s + C, T)
        ys.append(mlp(W, q[:, s:e]))
        written = [j for j in range(s, e) if rules[j] == "surprise"]
        if e - s < C:
            pending = x[:, written]
            break
        W0 = [w.detach().requires_grad_() for w in W]
        for j in written:
            loss = (mlp(W0, k[:, j : j + 1]) - v[:, j : j + 1]).pow(2).sum()
            u = torch.autograd.grad(loss, W0)
            S = [eta[:, j, None, None] * a - theta[:, j, None, None] * b for a, b in zip(S, u)]
            W = [(1 - alpha[:, j, None, None]) * a + b for a, b in zip(W, S)]
    return (torch.cat(ys, 1) @ m.out_proj.weight.T).detach(), W, S, pending


@pytest.mark.parametrize("C", [1, 4, 5])
@pytest.mark.parametrize("token_by_token", [False, True])
def test_mixed_rule_stream_keeps_chunks_aligned_with_the_stream(C, token_by_token):
    """surprise, none, surprise pieces (the bug: a "none" continuation used to stop the stream's clock, so the
    next "surprise" piece cut its chunks at offsets shifted by the "none" tokens)."""
    m = make_memory(2, chunk_size=C)
    plan = [("surprise", 6), ("none", 5), ("surprise", 7), ("none", 2), ("surprise", 9), ("none", 3)]
    T = sum(n for _, n in plan)
    x = rand_x(T=T)
    rules = [rule for rule, n in plan for _ in range(n)]
    pieces = [(rule, 1) for rule in rules] if token_by_token else plan
    state, ys, pos = None, [], 0
    with torch.no_grad():
        for rule, n in pieces:
            y, state, _ = m(x[:, pos : pos + n], state, update_rule=rule)
            ys.append(y)
            pos += n
            # the chunk phase is the stream position modulo C, and the pending rows are the written tokens
            # since the last multiple of C
            start = pos - pos % C
            assert state.position == pos and state.phase == pos % C
            assert state.pending.shape[1] == sum(r == "surprise" for r in rules[start:pos])
    y_ref, w_ref, s_ref, pending_ref = mixed_rule_reference(m, x, rules, C)
    assert_close(torch.cat(ys, 1), y_ref, 1e-9)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)
    assert torch.equal(state.pending, pending_ref)


def test_chunk1_mixed_rule_stream_equals_paper_oracle_on_the_written_tokens():
    m = make_memory(2, chunk_size=1, max_lr=1.0, init_lr=0.1)
    paper = PaperMemory(D, DM, depth=2, max_lr=1.0).to(F64)
    paper.load_state_dict(m.state_dict())
    x = rand_x(T=12)
    with torch.no_grad():
        _, state, _ = m(x[:, :5])
        _, state, _ = m(x[:, 5:8], state, update_rule="none")
        _, state, _ = m(x[:, 8:], state)
        _, w_ref, s_ref = paper(torch.cat([x[:, :5], x[:, 8:]], dim=1))
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_a_chunk_ending_under_none_is_applied_with_the_rule_of_its_rows(rule):
    m = make_memory(2, chunk_size=4)
    x = rand_x(T=9)
    with torch.no_grad():
        _, state, _ = m(x[:, :6], update_rule=rule)
        assert state.pending_rule == rule
        _, closed, _ = m(x[:, 6:9], state, update_rule="none")
        flushed = m.flush(state)
    for a, b in zip(closed.weights + closed.momentum, flushed.weights + flushed.momentum):
        assert_close(a, b, 1e-12)
    assert closed.phase == 1 and flushed.phase == 0 and flushed.position == 6


def test_switching_writing_rules_inside_a_chunk_applies_the_earlier_rows_first():
    m = make_memory(2, chunk_size=4)
    x = rand_x(T=8)
    with torch.no_grad():
        _, state, _ = m(x[:, :2], update_rule="surprise")
        _, switched, _ = m(x[:, 2:8], state, update_rule="ema")
        # reference: the 2 surprise rows as a short chunk, then the 2 ema rows finish the chunk, then a full
        # chunk
        short = m.flush(state)
        _, ref, _ = m(x[:, 2:4], short._replace(phase=2), update_rule="ema")
        _, ref, _ = m(x[:, 4:8], ref, update_rule="ema")
    for a, b in zip(switched.weights + switched.momentum, ref.weights + ref.momentum):
        assert_close(a, b, 1e-12)
    assert switched.phase == 0 and switched.pending.shape[1] == 0


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("C", [1, 4])
def test_update_rule_ema(depth, C):
    m = make_memory(depth, chunk_size=C)
    x = rand_x(T=14)
    with torch.no_grad():
        y, state, _ = m(x, update_rule="ema")
    y_ref, w_ref = ema_reference(m, x, C, m.ema_eps)
    assert_close(y, y_ref, 1e-9)
    assert_close(state.weights[-1], w_ref[-1], 1e-9)
    init = m.init_state(2, dtype=F64)
    assert not torch.allclose(state.weights[-1], init.weights[-1])
    for a, b in zip(state.weights[:-1] + state.momentum, init.weights[:-1] + init.momentum):
        assert torch.equal(a, b)  # other layers and the momentum untouched


def test_unknown_update_rule_raises():
    m = make_memory(1)
    with pytest.raises(ValueError, match="unknown update_rule 'sgd'"):
        m(rand_x(), update_rule="sgd")


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("rule", ["surprise", "ema"])
def test_gradients_reach_every_parameter(rule):
    m = make_memory(2, chunk_size=4, dtype=torch.float32)
    x = rand_x(T=10, dtype=torch.float32)
    y, state, _ = m(x, update_rule=rule)
    (y.square().sum() + sum(w.square().sum() for w in state.weights)).backward()
    expected = dict(m.named_parameters())
    if rule == "ema":  # ema uses only the learning-rate gate
        expected.pop("gate_weight")
        assert m.gate_weight.grad[0].abs().sum() > 0
    for name, p in expected.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_input_keeps_float32_state():
    m = make_memory(2, chunk_size=4, dtype=torch.float32)
    x = rand_x(T=10, dtype=torch.float32).to(torch.bfloat16)
    with torch.no_grad():
        y, state, stats = m(x)
        y32, state32, _ = m(x.float())
    assert y.dtype == torch.bfloat16 and state.weights[0].dtype == torch.float32
    assert state.pending.dtype == torch.float32
    assert_close(y.float(), y32, 2e-2)
    assert_close(state.weights[1], state32.weights[1], 1e-6)


def test_stats():
    m = make_memory(2, chunk_size=4, dtype=torch.float32)
    x = rand_x(T=10, dtype=torch.float32)
    _, state, stats = m(x)
    assert set(stats) >= {"surprise_norm", "lr_mean", "momentum_mean", "decay_mean"}
    assert all(v.ndim == 0 and not v.requires_grad and torch.isfinite(v) for v in stats.values())
    assert (
        stats["surprise_norm"] > 0 and 0 < stats["lr_mean"] < m.max_lr and float(stats["updated_tokens"]) == 8
    )
    assert 0 < stats["momentum_mean"] < 1 and 0 < stats["decay_mean"] < 1
    _, _, stats = m(x[:, :1], state)  # only a pending token: nothing applied
    assert float(stats["updated_tokens"]) == 0 and float(stats["surprise_norm"]) == 0
    # surprise_norm is the mean Frobenius norm of the per-token gradients, checked at chunk_size 1
    m1 = make_memory(2, chunk_size=1, dtype=F64)
    x1 = rand_x(T=3)
    _, _, st = m1(x1[:, :1])
    k, v, _, _ = projections(m1, x1[:, :1])
    W = [w.detach().unsqueeze(0).expand(2, -1, -1).clone().requires_grad_() for w in m1.initial_weights]
    norms = []
    for b in range(2):
        grads = torch.autograd.grad((mlp([w[b] for w in W], k[b]) - v[b]).pow(2).sum(), W)
        norms.append(sum(g.square().sum() for g in grads).sqrt())
    assert_close(st["surprise_norm"].double(), torch.stack(norms).mean().detach(), 1e-5)


def test_default_init_is_stable_on_a_long_stream():
    torch.manual_seed(0)
    m = NeuralMemory(64)  # defaults: depth 2, chunk 64
    base = torch.randn(1, 32, 64)
    x = base[:, torch.randint(0, 32, (2048,))] + 0.1 * torch.randn(1, 2048, 64)
    with torch.no_grad():
        k, v = m._keys(x[:, :256]), m.to_values(x[:, :256])
        before = (mlp(m.init_state(1).weights, k) - v).square().sum(-1).mean()
        y, state, _ = m(x)
        after = (mlp(state.weights, k) - v).square().sum(-1).mean()
    assert torch.isfinite(y).all() and all(torch.isfinite(w).all() for w in state.weights)
    assert after < 0.7 * before  # the memory learned the repeated associations


# ---------------------------------------------------------------- state (de)serialisation and validation


def test_state_dict_round_trip(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    m = make_memory(2, chunk_size=4, dtype=torch.float32)
    x = rand_x(T=14, dtype=torch.float32)
    with torch.no_grad():
        _, state, _ = m(x[:, :6])
        flat = m.state_to_dict(state, prefix="layers.3.memory.")
        safetensors_torch.save_file(flat, str(tmp_path / "state.safetensors"))
        loaded = m.state_from_dict(
            safetensors_torch.load_file(str(tmp_path / "state.safetensors")), "layers.3.memory."
        )
        assert isinstance(loaded, MemoryState) and loaded.position == 6 and loaded.pending.shape == (2, 2, D)
        y_a, st_a, _ = m(x[:, 6:], state)
        y_b, st_b, _ = m(x[:, 6:], loaded)
    assert torch.equal(y_a, y_b)
    for a, b in zip(st_a.weights + st_a.momentum, st_b.weights + st_b.momentum):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="missing keys"):
        m.state_from_dict({k: v for k, v in flat.items() if not k.endswith("momentum.1")}, "layers.3.memory.")
    with pytest.raises(ValueError, match="weights.0 has shape"):
        m.state_from_dict({**flat, "layers.3.memory.weights.0": torch.zeros(2, 3, 3)}, "layers.3.memory.")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(depth=0), "depth must be an integer >= 1"),
        (dict(chunk_size=0), "chunk_size must be an integer >= 1"),
        (dict(memory_dim=0), "memory_dim must be an integer >= 1"),
        (dict(expansion=0), "expansion must be > 0"),
        (dict(max_lr=0.0), "max_lr must be > 0"),
        (dict(max_lr=0.1, init_lr=0.2), "init_lr must be in"),
        (dict(init_momentum=1.0), "init_momentum must be in"),
        (dict(init_decay=0.0), "init_decay must be in"),
    ],
)
def test_bad_constructor_args_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        NeuralMemory(D, **kwargs)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        NeuralMemory(0)


def test_bad_inputs_raise():
    m = make_memory(2)
    x = rand_x()
    with pytest.raises(ValueError, match=r"expected input of shape \(B, T, 16\)"):
        m(x[..., :5])
    with pytest.raises(ValueError, match="state batch size 3 != input batch size 2"):
        m(x, m.init_state(3))
    with pytest.raises(ValueError, match="queries must have the shape of x"):
        m(x, queries=x[:, :4])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        m.init_state(0)


# ---------------------------------------------------------------- version 2: heads, centring, SiLU on v,
# ---------------------------------------------------------------- forgetting toward init, bounded chunk steps

V2 = dict(heads=2, update_bound=0.05, forget_toward_init=True, value_activation=True, centre_inputs=True)


def make_v2(chunk_size=4, dtype=F64, **overrides) -> NeuralMemory:
    m = make_memory(2, chunk_size=chunk_size, dtype=dtype, **{**V2, **overrides})
    if m.input_centre is not None:
        with torch.no_grad():
            m.input_centre.normal_(0.0, 0.3)
            m.query_centre.normal_(0.0, 0.3)
    return m


def v2_reference(m: NeuralMemory, x, chunk_lengths, queries=None):
    """Token loop over explicit chunks, per head: read with the chunk-start weights; each token's gradient at
    the chunk-start weights by autograd; the chunk's summed step (linear in the gradients: run the token
    recurrence once with gradients, once without) scaled per layer and head to norm <= update_bound; momentum
    and forgetting toward the initial weights token by token."""
    B, T, _ = x.shape
    H, d = m.heads, m.head_dim
    queries = x if queries is None else queries
    with torch.no_grad():
        xc = x if m.input_centre is None else x - m.input_centre
        qc = queries if m.query_centre is None else queries - m.query_centre

        def heads(t):  # (B, T, H*d) -> (B*H, T, d)
            return t.view(B, -1, H, d).transpose(1, 2).reshape(B * H, -1, d)

        k = F.normalize(heads(F.silu(xc @ m.to_keys.weight.T)), dim=-1)
        v = xc @ m.to_values.weight.T
        v = heads(F.silu(v) if m.value_activation else v)
        q = F.normalize(heads(F.silu(qc @ m.to_queries.weight.T)), dim=-1)
        g = (x @ m.gate_weight.T + m.gate_bias).repeat_interleave(H, dim=0)
        theta, eta, alpha = (
            m.max_lr * torch.sigmoid(g[..., 0]),
            torch.sigmoid(g[..., 1]),
            torch.sigmoid(g[..., 2]),
        )
        W0 = [w.reshape(H, -1, w.shape[1]).repeat(B, 1, 1) for w in m.initial_weights]
        W, S = [w.clone() for w in W0], [torch.zeros_like(w) for w in W0]
        ys, s = [], 0
        for n in chunk_lengths:
            out = mlp(W, q[:, s : s + n])
            ys.append(out.view(B, H, n, d).transpose(1, 2).reshape(B, n, H * d))
            start = [w.detach().requires_grad_() for w in W]
            with torch.enable_grad():
                grads = [
                    torch.autograd.grad((mlp(start, k[:, j : j + 1]) - v[:, j : j + 1]).pow(2).sum(), start)
                    for j in range(s, s + n)
                ]

            def run(use_grads, W, S, n=n, s=s, grads=grads):
                for j in range(n):
                    e, t, a = (z[:, s + j, None, None] for z in (eta, theta, alpha))
                    S = [e * Si - (t * u if use_grads else 0) for Si, u in zip(S, grads[j])]
                    W = [
                        w0 + (1 - a) * (Wi - w0) + Si if m.forget_toward_init else (1 - a) * Wi + Si
                        for Wi, w0, Si in zip(W, W0, S)
                    ]
                return W, S

            (W1, S1), (Wz, Sz) = run(True, W, S), run(False, W, S)
            if m.update_bound is not None:
                scale = [
                    (m.update_bound / (a - b).flatten(1).norm(dim=1)).clamp(max=1.0)[:, None, None]
                    for a, b in zip(W1, Wz)
                ]
                W1 = [b + c * (a - b) for a, b, c in zip(W1, Wz, scale)]
                S1 = [b + c * (a - b) for a, b, c in zip(S1, Sz, scale)]
            W, S, s = W1, S1, s + n
        y = torch.cat(ys, 1) @ m.out_proj.weight.T

    def unfold(t):
        return t.reshape(B, -1, t.shape[-1])

    return y, [unfold(w) for w in W], [unfold(t) for t in S]


@pytest.mark.parametrize(
    "option", ["all", "heads", "update_bound", "forget_toward_init", "value_activation", "centre_inputs"]
)
def test_version2_chunk1_equals_paper_oracle(option):
    """Each version-2 option alone (and all together) at chunk size 1 is exactly the token-by-token oracle."""
    off = dict(
        heads=1, update_bound=None, forget_toward_init=False, value_activation=False, centre_inputs=False
    )
    kw = V2 if option == "all" else {**off, option: V2[option]}
    m = make_v2(chunk_size=1, max_lr=1.0, init_lr=0.3, **kw)
    paper = PaperMemory(D, DM, depth=2, max_lr=1.0, **kw).to(F64)
    paper.load_state_dict(m.state_dict())
    x, qx = rand_x(T=9), rand_x(T=9, seed=7)
    with torch.no_grad():
        y, state, _ = m(x, queries=qx)
        y_ref, w_ref, s_ref = paper(x, queries=qx)
    assert_close(y, y_ref, 1e-9)
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)


def test_version2_meta_gradients_equal_paper_oracle():
    m = make_v2(chunk_size=1, max_lr=1.0, init_lr=0.3)
    paper = PaperMemory(D, DM, depth=2, max_lr=1.0, **V2).to(F64)
    paper.load_state_dict(m.state_dict())
    x, probe = rand_x(T=6), torch.randn(2, 6, D, dtype=F64)
    for model in (m, paper):
        out = model(x)
        (out[0] * probe).sum().add(
            out[1][0].square().sum() if model is paper else out[1].weights[0].square().sum()
        ).backward()
    for (name, a), (_, b) in zip(m.named_parameters(), paper.named_parameters()):
        assert a.grad is not None and b.grad is not None, name
        assert_close(a.grad, b.grad, 1e-8)


@pytest.mark.parametrize("C,T", [(4, 16), (4, 18), (8, 24)])
def test_version2_chunked_equals_reference_loop(C, T):
    m = make_v2(chunk_size=C)
    x, qx = rand_x(T=T), rand_x(T=T, seed=5)
    with torch.no_grad():
        y, state, _ = m(x, queries=qx)
        unbounded = make_v2(chunk_size=C, update_bound=None)(x)[1]
    y_ref, w_ref, s_ref = v2_reference(m, x, [C] * (T // C) + ([T % C] if T % C else []), queries=qx)
    assert_close(y, y_ref, 1e-9)
    applied = T // C * C
    _, w_ref, s_ref = v2_reference(m, x[:, :applied], [C] * (T // C))
    for a, b in zip(state.weights + state.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)
    assert not torch.allclose(state.weights[-1], unbounded.weights[-1])  # the bound is active


def test_flush_writes_the_unfinished_chunk():
    """6 tokens at chunk size 4: one chunk applied, 2 pending; flush applies them as a chunk of 2."""
    m = make_v2(chunk_size=4)
    x = rand_x(T=6)
    with torch.no_grad():
        _, state, _ = m(x)
        flushed = m.flush(state)
    _, w_ref, s_ref = v2_reference(m, x, [4, 2])
    for a, b in zip(flushed.weights + flushed.momentum, tuple(w_ref) + tuple(s_ref)):
        assert_close(a, b, 1e-9)
    assert flushed.pending.shape == (2, 0, D) and flushed.position == 6
    assert m.flush(flushed) is flushed and m.flush(state, "none") is state


def test_one_shot_storage_on_a_tiny_memory():
    """Pairs seen once are recalled far better than pairs never seen (the version-2 defaults of the MAC
    host)."""
    torch.manual_seed(0)
    m = NeuralMemory(
        64,
        chunk_size=4,
        max_lr=1.0,
        init_lr=0.5,
        init_momentum=0.1,
        init_decay=1e-4,
        update_bound=2.0,
        forget_toward_init=True,
        value_activation=True,
        centre_inputs=True,
    )
    written, fresh = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
    with torch.no_grad():
        _, state, _ = m(written)
        ratio = m.recall_error(state, written).mean() / m.recall_error(state, fresh).mean()
    assert ratio < 0.3, ratio


def test_calibrate_centre_sets_the_means():
    m = NeuralMemory(8, centre_inputs=True)
    x, q = torch.randn(2, 5, 8) + 3, torch.randn(2, 5, 8) - 1
    m.calibrate_centre(x, q)
    torch.testing.assert_close(m.input_centre.data, x.reshape(-1, 8).mean(0))
    torch.testing.assert_close(m.query_centre.data, q.reshape(-1, 8).mean(0))
    with pytest.raises(ValueError, match="built with centre_inputs=False"):
        NeuralMemory(8).calibrate_centre(x)


def test_state_dicts_without_phase_and_rule_load_as_before():
    """Dicts written before `phase` / `pending_rule` existed: phase = pending rows, rule "surprise"."""
    m = make_memory(2, chunk_size=4)
    with torch.no_grad():
        _, state, _ = m(rand_x(T=6))
    flat = m.state_to_dict(state)
    assert int(flat["phase"]) == 2 and int(flat["pending_rule"]) == 0
    old = {k: v for k, v in flat.items() if k not in ("phase", "pending_rule")}
    loaded = m.state_from_dict(old)
    assert (loaded.chunk_phase(), loaded.pending_rule, loaded.position) == (2, None, 6)
    assert "pending_rule" not in m.state_to_dict(loaded)  # unknown stays unknown
    with torch.no_grad():  # rows of unknown rule join the next writing call's chunk, as before phase existed
        x = rand_x(T=5, seed=4)
        _, a, _ = m(x, loaded, update_rule="ema")
        _, b, _ = m(x, state._replace(pending_rule="ema"), update_rule="ema")
    for u, v in zip(a.weights + a.momentum, b.weights + b.momentum):
        assert torch.equal(u, v)
    with pytest.raises(ValueError, match="do not fit the 2 pending rows"):
        m.state_from_dict(dict(flat, phase=torch.tensor(1)))
    with pytest.raises(ValueError, match="names no writing rule"):
        m.state_from_dict(dict(flat, pending_rule=torch.tensor(1)))  # "none"


def test_flush_after_none_tokens_starts_a_new_chunk():
    m = make_memory(2, chunk_size=4)
    x = rand_x(T=9)
    with torch.no_grad():
        _, state, _ = m(x[:, :5])  # phase 1, 1 pending
        _, state, _ = m(x[:, 5:7], state, update_rule="none")  # phase 3, still 1 pending
        flushed = m.flush(state)
        assert (flushed.phase, flushed.pending.shape[1], flushed.position) == (0, 0, 7)
        _, after, _ = m(x[:, 7:9], flushed)
    assert after.phase == 2 and after.pending.shape[1] == 2  # chunks now count from the flush
