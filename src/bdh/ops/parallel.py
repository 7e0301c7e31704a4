"""The masked quadratic form (SPEC §2, §3): the reference's training computation.

Notation: B batch, nh heads, T tokens, N neurons per head, D = n_embd.

    out = tril(Q Kᵀ, −1) V  (+ Q S₀ when a state is carried in)

with Q = K = rope(x) at absolute positions offset .. offset+T−1 and no softmax or scaling. The
diagonal is masked: a token never attends to itself. With damping λ the score of (t, τ) is scaled
by λ^{t−τ−1} and the carried state by λ^t, exactly what the token loop computes.
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
    scores = (q @ k.mT).tril(diagonal=-1)  # (B, nh, T, T)
    if damping is not None:
        scores = scores * causal_decay(damping.to(scores.dtype), T)
    out = scores @ vals  # (B, nh, T, D); values are shared by the heads
    if state is not None:
        out = out + _read_state(q, state, damping)
    if not need_state:
        return out, None
    return out, _write_state(k, vals, state, damping)


def _read_state(q: Tensor, state: Tensor, damping: Tensor | None) -> Tensor:
    """Q S₀, with row t scaled by λ^t: the carried state decays for t steps before it is read."""
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
    new = k.mT @ vals.to(sdtype)  # (B, nh, N, D)
    if state is None:
        return new
    carried = state if damping is None else state * (lam**T)[None, :, None, None]
    return carried + new
