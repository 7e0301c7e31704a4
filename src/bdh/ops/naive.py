"""The spec: linear attention as a token loop over an explicit state (SPEC §3).

Notation: B batch, nh heads, T tokens, N neurons per head, D = n_embd.

For every position t, *read before write*:

    k_t = rope_t(x_t)              # (N,)
    a_t = k_tᵀ S                   # (D,)  sees only τ < t: a token never attends to itself
    S  ← λ·S + k_t ⊗ v_t           # rank-1 Hebbian write (λ = 1 without damping)

S is kept in float32 (float64 when the inputs are float64) whatever the input precision. This form
is slow on purpose: it is the yardstick every other form is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdh.ops.common import prepare


def naive(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None = None,
    state: Tensor | None = None,
    offset: int = 0,
    damping: Tensor | None = None,
    *,
    detach_kv: bool = False,
) -> tuple[Tensor, Tensor]:
    """x (B, nh, T, N) neurons before rotation, v (B, 1|nh, T, D) values, state (B, nh, N, D).

    Returns the attention output (B, nh, T, D) and the state after the last token.
    """
    q, k, vals, S, lam = prepare(x, v, freqs, state, offset, damping, detach_kv)
    outputs = []
    for t in range(q.shape[2]):
        outputs.append(torch.einsum("bhn,bhnd->bhd", q[:, :, t], S))  # read ...
        if lam is not None:
            S = S * lam[:, :, None]
        S = S + k[:, :, t, :, None] * vals[:, :, t, None, :]  # ... then write
    return torch.stack(outputs, dim=2).to(x.dtype), S
