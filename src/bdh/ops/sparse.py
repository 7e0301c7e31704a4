"""Sparse-active decoding kernels: touch only the rows of neurons that fire (SPEC §3, paper §4.1).

Notation: G = B·nh groups (one per stream and head), N neurons per head, D = n_embd, M the number of
active rows gathered, n = nh·N.

A trained BDH fires ~5–20% of its neurons, and a token's rotated key k = rope_t(x_t) is non-zero
only on the rotary *pairs* (2j, 2j+1) that hold an active neuron: the rotation mixes each pair, so
an active neuron lights up its neighbour too. The recurrent step

    a = kᵀ S ;  S ← S + k ⊗ v

then reads and writes only the rows of S where k ≠ 0 — the exact same numbers as the dense step,
at a fraction of its memory traffic. Rows with k = 0 are neither read (they add 0) nor written
(they gain 0). Damping (S ← λS) touches every row, so damped models take the dense step.

The same holds for the y-path: y = x ⊙ relu(a D_y) is zero wherever x is, so only the columns of
D_y at active x are needed, and the decoder product y E only needs the rows of E where y ≠ 0.
All functions here work without autograd, in place, for decoding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def density(x: Tensor) -> float:
    """Fraction of non-zero entries, the number the dense/sparse choice is made on."""
    return float(torch.count_nonzero(x)) / max(1, x.numel())


def active_rows(k: Tensor) -> Tensor:
    """Flat indices g·N + i of the non-zero entries of k (G, N), in increasing order: (M,)."""
    return k.reshape(-1).nonzero().squeeze(1)


# ------------------------------------------------------------------ the state: read then write
def state_step_dense(k: Tensor, v: Tensor, S: Tensor) -> Tensor:
    """k (G, N) rotated key = query, v (G, D), S (G, N, D) updated in place → read (G, D)."""
    out = (k.unsqueeze(1) @ S).squeeze(1)  # (G, D), before the write: a token never sees itself
    S.addcmul_(k.unsqueeze(2), v.unsqueeze(1))  # S += k ⊗ v without materialising it
    return out


def state_step_sparse(k: Tensor, v: Tensor, S: Tensor, rows: Tensor | None = None) -> Tensor:
    """As `state_step_dense`, reading and writing only the rows where k ≠ 0 (or `rows`)."""
    G, N, D = S.shape
    rows = active_rows(k) if rows is None else rows  # (M,)
    group = torch.div(rows, N, rounding_mode="floor")  # (M,) which (stream, head) a row is in
    k_act = k.reshape(-1).index_select(0, rows)  # (M,)
    S_flat = S.view(G * N, D)
    S_act = S_flat.index_select(0, rows)  # (M, D): the only rows of S this step reads ...
    out = _segment_matvec(k_act, S_act, group, G)  # (G, D)
    # ... and the only rows it writes (index_add_ is ~3x faster than index_copy_ on CPU).
    S_flat.index_add_(0, rows, k_act.unsqueeze(1) * v.index_select(0, group))
    return out


def _segment_matvec(weights: Tensor, rows: Tensor, group: Tensor, G: int) -> Tensor:
    """Σ over the rows of each group of weight·row: (M,), (M, D), (M,) → (G, D).

    Done as one small matmul with a (G, M) selector that is zero off each row's group: G is a
    handful (B·nh), so the extra multiply-adds are free while the rows are read only once.
    """
    M = weights.shape[0]
    select = weights.new_zeros(G * M)  # (G, M) flat: entry (group[m], m) holds weights[m]
    select.index_copy_(0, group * M + torch.arange(M, device=weights.device), weights)
    return select.view(G, M) @ rows


# ------------------------------------------------------------------ the key-value cache
def kv_read_dense(k: Tensor, keys_t: Tensor, length: int) -> Tensor:
    """Scores of k (G, N) against the cached keys, stored transposed (G, N, cap) → (G, length)."""
    return (k.unsqueeze(1) @ keys_t[:, :, :length]).squeeze(1)


def kv_read_sparse(k: Tensor, keys_t: Tensor, length: int, rows: Tensor) -> Tensor:
    """As `kv_read_dense`, reading only the cached key rows where the query is non-zero."""
    G, N, cap = keys_t.shape
    group = torch.div(rows, N, rounding_mode="floor")
    k_act = k.reshape(-1).index_select(0, rows)  # (M,)
    keys_act = keys_t.view(G * N, cap).index_select(0, rows)[:, :length]  # (M, length)
    return _segment_matvec(k_act, keys_act, group, G)  # (G, length)


# ------------------------------------------------------------------ the y-path
def y_path_sparse(
    x: Tensor, a: Tensor, encoder_v_t: Tensor, decoder: Tensor
) -> tuple[Tensor, float]:
    """u = (x ⊙ relu(a D_y)) E computed on active neurons only; returns u (B, D), density of y.

    x (B, nh, N) ≥ 0, a (B, nh, D), decoder (nh·N, D), encoder_v_t (nh·N, D) = D_y transposed with
    head-major rows (row h·N + i is neuron i of head h, contiguous so active rows gather cheaply).
    With B > 1 the active set is the union over the batch (still exact: the rest are zeros).
    """
    B, nh, N = x.shape
    x_flat = x.reshape(B, nh * N)
    cols = x_flat.any(0).nonzero().squeeze(1)  # (M,) neurons active in some stream
    head = torch.div(cols, N, rounding_mode="floor")  # (M,)
    dy = encoder_v_t.index_select(0, cols)  # (M, D)
    # Every head's a against every gathered row, then keep each row's own head: (B·nh, M) → (B, M).
    scores = (a.reshape(B * nh, -1).to(dy.dtype) @ dy.mT).view(B, nh, -1)
    ys = scores.gather(1, head.expand(B, 1, -1)).squeeze(1)  # (B, M)
    y = x_flat.index_select(1, cols) * torch.relu(ys).to(x.dtype)  # (B, M)
    fired = y.any(0).nonzero().squeeze(1)  # rows of E that matter: y ≠ 0 somewhere
    u = y.index_select(1, fired).to(decoder.dtype) @ decoder.index_select(0, cols[fired])
    return u, fired.numel() / (nh * N)


def y_path_dense(x: Tensor, a: Tensor, encoder_v: Tensor, decoder: Tensor) -> tuple[Tensor, float]:
    """u = (x ⊙ relu(a D_y)) E with every neuron: x (B, nh, N), a (B, nh, D) → (B, D), density."""
    B, nh, N = x.shape
    ys = torch.relu(a.transpose(0, 1).to(encoder_v.dtype) @ encoder_v)  # (nh, B, N)
    y = (x * ys.transpose(0, 1).to(x.dtype)).reshape(B, nh * N)  # (B, n)
    return y.to(decoder.dtype) @ decoder, density(y.any(0))
