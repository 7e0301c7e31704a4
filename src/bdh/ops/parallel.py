"""The masked quadratic form (SPEC §2, §3): the reference's training computation.

Notation: B batch, nh heads, T tokens, N neurons per head, D = n_embd.

    out = tril(Q Kᵀ, −1) V  (+ Q S₀ when a state is carried in)

with Q = K = rope(x) at absolute positions offset .. offset+T−1 and no softmax or scaling. The
diagonal is masked: a token never attends to itself. With damping λ the score of (t, τ) is scaled
by λ^{t−τ−1} and the carried state by λ^t, exactly what the token loop computes.

The masked product runs in `causal_product`, which never computes the upper triangle: T is cut
into blocks of rows and row block i meets only the keys up to its own end, so the forward costs
about half of the full T×T×N product. Its backward uses Q = K: the score gradient G (T×T) reaches
Q both as queries and as keys, dQ = (G + Gᵀ) Q, one dense product where autograd would do two.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdh.ops.common import rotate_queries, state_dtype


def decay_powers(lam: Tensor, T: int, start: int) -> Tensor:
    """λ^(start + i) for i = 0..T−1, per head: (nh, T)."""
    exponents = torch.arange(T, device=lam.device, dtype=lam.dtype) + start
    return lam[:, None] ** exponents


def causal_decay(lam: Tensor, T: int) -> Tensor:
    """(nh, T, T) with λ^{t−τ−1} below the diagonal and 0 on and above it."""
    t = torch.arange(T, device=lam.device, dtype=lam.dtype)
    gap = (t[:, None] - t[None, :] - 1).clamp(min=0)
    return (lam[:, None, None] ** gap).tril(-1)


def parallel(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None = None,
    state: Tensor | None = None,
    offset: int = 0,
    damping: Tensor | None = None,
    *,
    detach_kv: bool = False,
    need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """x (B, nh, T, N), v (B, 1|nh, T, D), state (B, nh, N, D) → out (B, nh, T, D), state.

    need_state=False skips the final state (training does not need it) and returns None for it.
    """
    T = x.shape[2]
    q = rotate_queries(x, freqs, offset)  # (B, nh, T, N)
    k, vals = (q.detach(), v.detach()) if detach_kv else (q, v)
    decay = None if damping is None else causal_decay(damping.to(q.dtype), T)  # (nh, T, T)
    out = causal_product(q, v, decay, detach_kv=detach_kv)  # (B, nh, T, D), values shared by heads
    if state is not None:
        out = out + _read_state(q, state, damping)
    if not need_state:
        return out, None
    return out, _write_state(k, vals, state, damping)


BLOCK = 128  # rows per block: big enough for efficient products, small enough to skip ~½ of T×T


def causal_product(
    q: Tensor,
    v: Tensor,
    decay: Tensor | None = None,
    *,
    detach_kv: bool = False,
    block: int = BLOCK,
) -> Tensor:
    """tril(Q Qᵀ, −1) V for q (..., T, N) and v (..., T, D), batch dims broadcast (v may share
    one head across all); decay (..., T, T) multiplies the scores (damping). detach_kv: the
    gradient reaches q only as queries and never reaches v (paper §7.2). Returns (..., T, D).
    """
    if block < 1:
        raise ValueError(f"block must be a positive integer, got {block}")
    return _CausalProduct.apply(q, v, decay, detach_kv, block)


class _CausalProduct(torch.autograd.Function):
    """The masked product with only the blocks on or below the diagonal computed."""

    @staticmethod
    def forward(ctx, q, v, decay, detach_kv, block):  # type: ignore[override]
        decay_dtype = None if decay is None else decay.dtype
        q, v, decay = _autocast_inputs(q, v, decay)
        T = q.shape[-2]
        rows, outs = [], []
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, T, block):
                stop = min(start + block, T)
                s = q[..., start:stop, :] @ q[..., :stop, :].mT  # (..., rows, stop)
                s[..., start:].tril_(-1)  # diagonal block: a token never attends to itself
                if decay is not None:
                    s.mul_(decay[..., start:stop, :stop])
                outs.append(s @ v[..., :stop, :])  # (..., rows, D)
                rows.append(s)
        ctx.detach_kv, ctx.block = detach_kv, block
        ctx.v_shape = v.shape
        ctx.decay_dtype = None if decay is None else decay_dtype
        ctx.save_for_backward(q, v, decay, *rows)
        return torch.cat(outs, dim=-2)

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, v, decay, *rows = ctx.saved_tensors
        dout = dout.to(q.dtype)
        dq = dv = ddecay = None
        with torch.autocast(q.device.type, enabled=False):
            if ctx.needs_input_grad[2]:  # a learned damping: ∂/∂decay = G ⊙ undecayed scores
                raw = (q @ q.mT).tril_(-1)  # (..., T, T)
                ddecay = ((dout @ v.mT) * raw).sum_to_size(decay.shape).to(ctx.decay_dtype)
            if ctx.needs_input_grad[0]:
                g = (dout @ v.mT).tril_(-1)  # (..., T, T) score gradient, upper triangle unused
                if decay is not None:
                    g.mul_(decay)
                # K = Q: the scores' gradient reaches q as queries (G Q) and as keys (Gᵀ Q).
                dq = (g if ctx.detach_kv else g + g.mT) @ q  # (..., T, N)
            if ctx.needs_input_grad[1] and not ctx.detach_kv:
                dv = _values_grad(rows, dout, ctx.block).sum_to_size(ctx.v_shape)
        return dq, dv, ddecay, None, None


def _values_grad(rows: list[Tensor], dout: Tensor, block: int) -> Tensor:
    """Σ_i S_iᵀ dout_i over the row blocks: (..., T, D) before summing the shared heads."""
    dv = torch.zeros_like(dout)  # (..., T, D)
    for i, s in enumerate(rows):
        start, stop = i * block, i * block + s.shape[-2]
        dv[..., :stop, :] += s.mT @ dout[..., start:stop, :]
    return dv


def _autocast_inputs(
    q: Tensor, v: Tensor, decay: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Under autocast, run the whole product in the autocast dtype (the state stays float32)."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        dtype = torch.promote_types(q.dtype, v.dtype)
    else:
        dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), v.to(dtype), None if decay is None else decay.to(dtype)


def _read_state(q: Tensor, state: Tensor, damping: Tensor | None) -> Tensor:
    """Q S₀, with row t scaled by λ^t: the carried state decays for t steps before it is read."""
    with torch.autocast(q.device.type, enabled=False):  # the state is float32 even under bf16
        read = q.to(state.dtype) @ state  # (B, nh, T, D)
    if damping is not None:
        read = read * decay_powers(damping.to(state.dtype), q.shape[2], 0)[None, :, :, None]
    return read.to(q.dtype)


def _write_state(k: Tensor, vals: Tensor, state: Tensor | None, damping: Tensor | None) -> Tensor:
    """S = λ^T S₀ + Σ_τ λ^{T−1−τ} k_τ ⊗ v_τ, in float32 at least."""
    T = k.shape[2]
    sdtype = state_dtype(k.dtype)
    k = k.to(sdtype)
    if damping is not None:
        lam = damping.to(sdtype)
        k = k * decay_powers(lam, T, 0).flip(-1)[None, :, :, None]  # λ^{T−1−τ}
    with torch.autocast(k.device.type, enabled=False):
        new = k.mT @ vals.to(sdtype)  # (B, nh, N, D)
    if state is None:
        return new
    carried = state if damping is None else state * (lam**T)[None, :, None, None]
    return carried + new
