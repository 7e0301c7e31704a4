"""The chunked form (SPEC §3): the masked form inside chunks of C tokens, the state across them.

Notation: B batch, nh heads, T tokens, C chunk length, N neurons per head, D = n_embd.

Memory is O(T·C) instead of O(T²). The state and the absolute position go in and out, so a
sequence of any length can be processed piece by piece (prefill, truncated BPTT) and resumed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bdh.ops.parallel import parallel


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
    outputs = []
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        out, state = parallel(
            x[:, :, start:stop],
            v[:, :, start:stop],
            freqs,
            state,
            offset + start,  # phases use absolute positions
            damping,
            detach_kv=detach_kv,
            need_state=need_state or stop < T,
        )
        outputs.append(out)
    return torch.cat(outputs, dim=2), state
