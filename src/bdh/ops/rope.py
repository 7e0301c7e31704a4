"""Rotary phases with paired ("quantized") per-neuron frequencies (SPEC §2).

Notation: N neurons per head, T positions.

    freq[i]     = θ^(−2·floor(i/2) / N) / (2π),  θ = 2^16
    angle(t, i) = frac(t · freq[i]) · 2π          (t absolute, 0-based)
    rope_t(v)[2j]   = v[2j]·cos − v[2j+1]·sin
    rope_t(v)[2j+1] = v[2j+1]·cos + v[2j]·sin

Phases use *absolute* positions: every form (parallel, chunked, recurrent) must compute the same
`t · freq` product in the same precision, or the forms drift apart at long contexts. Rotations are
orthogonal, so ⟨rope_t a, rope_τ b⟩ depends only on t − τ (the paper's U^{t−τ}).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ROPE_THETA = 2.0**16


def frequencies(N: int, theta: float = ROPE_THETA, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-neuron frequencies in turns per position, (N,); neurons 2j and 2j+1 share one."""
    paired = torch.div(torch.arange(N, dtype=dtype), 2, rounding_mode="floor") * 2
    return 1.0 / (theta ** (paired / N)) / (2 * math.pi)


def cos_sin(freqs: Tensor, offset: int, T: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles at positions offset .. offset+T−1, each (T, N)."""
    freqs = freqs.reshape(-1)
    t = torch.arange(offset, offset + T, device=freqs.device, dtype=freqs.dtype)
    turns = t[:, None] * freqs  # (T, N) — the product every form shares
    angles = (turns % 1) * (2 * math.pi)
    return torch.cos(angles), torch.sin(angles)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply the pairwise rotation to x (..., T, N) with cos/sin (T, N)."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., T, N/2, 2)
    swapped = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (-x_odd, x_even)
    return x * cos.to(x.dtype) + swapped * sin.to(x.dtype)


def rope(x: Tensor, freqs: Tensor, offset: int = 0) -> Tensor:
    """rope_t(x_t) for x (..., T, N) at absolute positions offset .. offset+T−1."""
    cos, sin = cos_sin(freqs, offset, x.shape[-2])
    return rotate(x, cos, sin)
