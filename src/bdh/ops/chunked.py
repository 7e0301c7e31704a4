"""The chunked form (SPEC §3): the masked form inside chunks of C tokens, the state across them.

Notation: B batch, nh heads, T tokens, C chunk length, nc = T // C chunks, N neurons per head,
D = n_embd.

Memory is O(T·C) instead of O(T²). The state and the absolute position go in and out, so a
sequence of any length can be processed piece by piece (prefill, truncated BPTT) and resumed.

All whole chunks are computed at once, as batched products over a chunk axis:

    out_c = tril(Q_c Q_cᵀ, −1) V_c + Q_c S_c        S_c = S₀ + Σ_{j<c} Q_jᵀ V_j

which costs ~C·(N + D) + 4·N·D multiply-adds per token and head instead of the masked form's
~T·(N + D): cheaper once T exceeds C by about 4·D. The T mod C tokens left over go through the
masked form, starting from the state after the last whole chunk. With damping λ every chunk decays
the carried state by λ^C, row t of a chunk reads it scaled by λ^t, and key τ is written with
λ^{C−1−τ}, which is the token loop's arithmetic regrouped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdh.ops.common import rotate_queries, state_dtype
from bdh.ops.parallel import causal_decay, causal_product, decay_powers, parallel


def chunked(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None = None,
    state: Tensor | None = None,
    offset: int = 0,
    damping: Tensor | None = None,
    *,
    detach_kv: bool = False,
    chunk_size: int = 64,
    need_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """x (B, nh, T, N), v (B, 1|nh, T, D), state (B, nh, N, D) → out (B, nh, T, D), state."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    T = x.shape[2]
    q = rotate_queries(x, freqs, offset)  # (B, nh, T, N); rotated once for every chunk
    main = T - T % chunk_size
    if main == 0:
        return parallel(
            q, v, None, state, offset, damping, detach_kv=detach_kv, need_state=need_state
        )
    out, state = _whole_chunks(
        q[:, :, :main],
        v[:, :, :main],
        state,
        damping,
        chunk_size,
        detach_kv,
        need_state or main < T,
    )
    if main == T:
        return out, state
    tail, state = parallel(
        q[:, :, main:], v[:, :, main:], None, state, offset + main, damping,
        detach_kv=detach_kv, need_state=need_state,
    )  # fmt: skip
    return torch.cat((out, tail), dim=2), state


def _whole_chunks(
    q: Tensor,
    v: Tensor,
    state: Tensor | None,
    damping: Tensor | None,
    C: int,
    detach_kv: bool,
    need_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """q (B, nh, nc·C, N) already rotated → out (B, nh, nc·C, D) and the state after it."""
    qc = q.unflatten(2, (-1, C))  # (B, nh, nc, C, N)
    vc = v.unflatten(2, (-1, C))  # (B, 1|nh, nc, C, D)
    lam = None if damping is None else damping.to(state_dtype(q.dtype))
    decay = None if lam is None else causal_decay(lam.to(q.dtype), C)[:, None]  # (nh, 1, C, C)
    out = causal_product(qc, vc, decay, detach_kv=detach_kv)  # (B, nh, nc, C, D) inside chunks
    kc, vals = (qc.detach(), vc.detach()) if detach_kv else (qc, vc)
    with torch.autocast(q.device.type, enabled=False):  # the state is float32 even under bf16
        writes = _chunk_writes(kc, vals, lam)  # (B, nh, nc, N, D)
        before, final = _scan(writes, state, None if lam is None else lam**C, need_state)
        reads = qc.to(before.dtype) @ before  # (B, nh, nc, C, D)
    if lam is not None:
        reads = reads * decay_powers(lam, C, 0)[None, :, None, :, None]  # λ^t inside the chunk
    return (out + reads.to(out.dtype)).flatten(2, 3), final


def _chunk_writes(kc: Tensor, vc: Tensor, lam: Tensor | None) -> Tensor:
    """Σ_τ λ^{C−1−τ} k_τ ⊗ v_τ for every chunk: (B, nh, nc, N, D) in the state's precision."""
    sdtype = state_dtype(kc.dtype)
    kc = kc.to(sdtype)
    if lam is not None:
        C = kc.shape[-2]
        kc = kc * decay_powers(lam, C, 0).flip(-1)[None, :, None, :, None]
    return kc.mT @ vc.to(sdtype)


def _scan(
    writes: Tensor, state: Tensor | None, lam_c: Tensor | None, need_state: bool
) -> tuple[Tensor, Tensor | None]:
    """The state before every chunk (B, nh, nc, N, D) and, if needed, after the last one.

    S_c = λ^C S_{c−1} + W_{c−1}; a short Python loop over nc chunks of (B, nh, N, D) additions.
    """
    B, nh, nc, N, D = writes.shape
    S = writes.new_zeros(B, nh, N, D) if state is None else state.to(writes.dtype)
    lam = None if lam_c is None else lam_c.view(1, nh, 1, 1)
    before = []
    for c in range(nc):
        before.append(S)
        if c < nc - 1 or need_state:
            S = (S if lam is None else S * lam) + writes[:, :, c]
    return torch.stack(before, dim=2), (S if need_state else None)
