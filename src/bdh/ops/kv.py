"""The key-value form of the attention, for contexts below the crossover (SPEC §3).

Notation: B batch, nh heads, T tokens read so far (cache length), C new tokens, N neurons per head,
D = n_embd, cap the cache capacity.

Instead of S = Σ_τ k_τ ⊗ v_τ (N·D floats per head), keep the keys k_τ = rope_τ(x_τ) and values v_τ:
(nh·N + D) floats per token. Reading costs T·(N + D) per head instead of N·D, so below roughly
T* = n·D / (n + D) tokens (≈ D) the cache is both smaller and cheaper; above it the state wins, and
`to_state` folds the cache into S — the same numbers up to float rounding.

Keys are stored transposed, (B, nh, N, cap): a query that fires on M of the N neurons reads M
contiguous rows, and writing a new key touches only its non-zero entries (unused slots stay zero).
Keys use absolute positions like every other form; damping scales the score of (t, τ) by λ^{t−τ−1}.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bdh.ops.parallel import parallel
from bdh.ops.rope import rope
from bdh.ops.sparse import active_rows, kv_read_dense, kv_read_sparse


def crossover(n: int, D: int) -> int:
    """T* = n·D/(n + D): the context at which a key-value cache holds as many floats as S."""
    return max(1, (n * D) // (n + D))


@dataclass
class KVCache:
    """Per layer: keys (B, nh, N, cap) rotated and transposed, values (B, cap, D); `length` used."""

    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    length: int = 0

    @classmethod
    def zeros(
        cls,
        n_layer: int,
        batch_size: int,
        n_head: int,
        N: int,
        D: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        keys = [torch.zeros(batch_size, n_head, N, capacity, device=device, dtype=dtype)]
        values = [torch.zeros(batch_size, capacity, D, device=device, dtype=dtype)]
        for _ in range(n_layer - 1):
            keys.append(torch.zeros_like(keys[0]))
            values.append(torch.zeros_like(values[0]))
        return cls(keys, values, 0)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[-1]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def clone(self) -> KVCache:
        return KVCache(
            [k.clone() for k in self.keys], [v.clone() for v in self.values], self.length
        )

    def to(self, device: torch.device | str) -> KVCache:
        return KVCache(
            [k.to(device) for k in self.keys], [v.to(device) for v in self.values], self.length
        )

    def select(self, rows: Tensor) -> KVCache:
        """Keep only the streams `rows` (a 1-D index)."""
        pick = [k.index_select(0, rows) for k in self.keys]
        return KVCache(pick, [v.index_select(0, rows) for v in self.values], self.length)

    def to_state(self, damping: Tensor | None = None) -> list[Tensor]:
        """S = Σ_τ λ^{T−1−τ} k_τ ⊗ v_τ per layer, (B, nh, N, D): what the state form holds."""
        T = self.length
        states = []
        for keys_t, values in zip(self.keys, self.values, strict=True):
            k = keys_t[..., :T]  # (B, nh, N, T)
            if damping is not None:
                k = k * _decay_to_end(damping.to(k.dtype), T)[None, :, None, :]  # T may be 0
            states.append(k @ values[:, None, :T])  # (B, nh, N, D)
        return states


def _decay_to_end(lam: Tensor, T: int) -> Tensor:
    """λ^{T−1−τ} for τ = 0..T−1, per head: (nh, T)."""
    exponents = torch.arange(T - 1, -1, -1, device=lam.device, dtype=lam.dtype)
    return lam[:, None] ** exponents


# ------------------------------------------------------------------ one token
def kv_token(
    k: Tensor,
    v: Tensor,
    keys_t: Tensor,
    values: Tensor,
    length: int,
    damping: Tensor | None = None,
    sparse: bool = False,
) -> Tensor:
    """Read then append one token: k (B, nh, N) rotated at position `length`, v (B, D) → (B, nh, D).

    keys_t (B, nh, N, cap) and values (B, cap, D) are written in place at slot `length`.
    """
    B, nh, N = k.shape
    G = B * nh
    kg, keys_g = k.reshape(G, N), keys_t.view(G, N, -1)
    rows = active_rows(kg) if sparse else None
    if length == 0:
        out = k.new_zeros(B, nh, v.shape[-1])
    else:
        if rows is not None:
            scores = kv_read_sparse(kg, keys_g, length, rows)  # (G, T)
        else:
            scores = kv_read_dense(kg, keys_g, length)
        scores = scores.view(B, nh, length)
        if damping is not None:  # the key at τ has decayed t − τ − 1 times by step t = length
            scores = scores * _decay_to_end(damping.to(scores.dtype), length)[None]
        out = scores @ values[:, :length]  # (B, nh, D); values are shared by the heads
    if rows is not None:  # unused slots are zero, so only the key's non-zero entries are written
        keys_g.view(G * N, -1)[rows, length] = kg.reshape(-1)[rows]
    else:
        keys_t[..., length] = k
    values[:, length] = v
    return out


# ------------------------------------------------------------------ several tokens (prefill)
def kv_chunk(
    x: Tensor,
    v: Tensor,
    freqs: Tensor | None,
    keys_t: Tensor,
    values: Tensor,
    length: int,
    damping: Tensor | None = None,
) -> Tensor:
    """x (B, nh, C, N) unrotated neurons at positions length.., v (B, 1, C, D) → (B, nh, C, D).

    Inside the chunk the masked form; against the C cached tokens before it, the cached keys.
    Appends the chunk to the cache in place.
    """
    C = x.shape[2]
    out, _ = parallel(x, v, freqs, None, length, damping, need_state=False)
    q = x if freqs is None else rope(x, freqs, length)  # (B, nh, C, N)
    if length:
        scores = q @ keys_t[..., :length]  # (B, nh, C, T)
        if damping is not None:  # query at length + c, key at τ: λ^{length + c − τ − 1}
            lam = damping.to(scores.dtype)
            gap = torch.arange(C, device=x.device)[:, None] + length - 1
            gap = gap - torch.arange(length, device=x.device)[None, :]
            scores = scores * lam.view(-1, 1, 1) ** gap.to(lam.dtype)
        out = out + scores @ values[:, None, :length]
    keys_t[..., length : length + C] = q.mT
    values[:, length : length + C] = v[:, 0]
    return out
