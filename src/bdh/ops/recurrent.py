"""The recurrent form (SPEC §3): one token at a time, O(nh·N·D) per token whatever the context.

Notation: B batch, nh heads, N neurons per head, D = n_embd.

    a_t = rope_t(x_t)ᵀ S ;  S ← λ·S + rope_t(x_t) ⊗ v_t

With inplace=True (decoding, no autograd) the state tensor is updated where it lies, which saves
allocating and copying nh·N·D floats per token and layer; sparse=True then also reads and writes
only the rows of S where the rotated key is non-zero (`bdh.ops.sparse`; damping needs every row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdh.ops.common import rotate_queries, state_dtype, zeros_state
from bdh.ops.sparse import state_step_sparse


def recurrent(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None = None,
    state: Tensor | None = None,
    offset: int = 0,
    damping: Tensor | None = None,
    *,
    detach_kv: bool = False,
    inplace: bool = False,
    sparse: bool = False,
) -> tuple[Tensor, Tensor]:
    """x (B, nh, T, N), v (B, 1|nh, T, D), state (B, nh, N, D) → out (B, nh, T, D), state.

    Steps through the T tokens one by one; T = 1 is the decoding case.
    """
    S = zeros_state(x, v.shape[-1]) if state is None else state
    if (inplace or sparse) and (torch.is_grad_enabled() or S.dtype != state_dtype(x.dtype)):
        raise ValueError("inplace/sparse need autograd off and a state in the state precision")
    if sparse and (damping is not None or not S.is_contiguous()):
        sparse = False  # λS touches every row; the dense step is then the cheaper one
    outputs = []
    for t in range(x.shape[2]):
        out, S = step(
            x[:, :, t : t + 1],
            v[:, :, t : t + 1],
            freqs,
            S,
            offset + t,
            damping,
            detach_kv=detach_kv,
            inplace=inplace or sparse,
            sparse=sparse,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=2), S


def step(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None,
    S: Tensor,
    offset: int,
    damping: Tensor | None,
    *,
    detach_kv: bool = False,
    inplace: bool = False,
    sparse: bool = False,
) -> tuple[Tensor, Tensor]:
    """One token: x (B, nh, 1, N), v (B, 1|nh, 1, D), S (B, nh, N, D)."""
    q = rotate_queries(x, freqs, offset).to(S.dtype)  # (B, nh, 1, N)
    if sparse:
        B, nh, _, N = q.shape
        D = S.shape[-1]
        vg = v.to(S.dtype).expand(B, nh, 1, D).reshape(B * nh, D)
        out = state_step_sparse(q.reshape(B * nh, N), vg, S.view(B * nh, N, D))
        return out.view(B, nh, 1, D).to(x.dtype), S
    out = (q @ S).to(x.dtype)  # read before write: the token does not see itself
    k, vals = q.mT, v.to(S.dtype)  # (B, nh, N, 1), (B, 1|nh, 1, D)
    if detach_kv:
        k, vals = k.detach(), vals.detach()
    lam = None if damping is None else damping.to(S.dtype).view(1, -1, 1, 1)
    if inplace:
        if lam is not None:
            S.mul_(lam)
        S.addcmul_(k, vals)  # S += k ⊗ v without materialising the outer product
        return out, S
    if lam is not None:
        S = S * lam
    return out, S + k * vals
