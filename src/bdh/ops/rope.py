"""Rotary phases with paired ("quantized") per-neuron frequencies (SPEC §2).

Notation: N neurons per head, T positions.

    freq[i]     = θ^(−2·floor(i/2) / N) / (2π),  θ = 2^16
    angle(t, i) = frac(t · freq[i]) · 2π          (t absolute, 0-based)
    rope_t(v)[2j]   = v[2j]·cos − v[2j+1]·sin
    rope_t(v)[2j+1] = v[2j+1]·cos + v[2j]·sin

Phases use *absolute* positions: every form (parallel, chunked, recurrent) must compute the same
`t · freq` product in the same precision, or the forms drift apart at long contexts. Rotations are
orthogonal, so ⟨rope_t a, rope_τ b⟩ depends only on t − τ (the paper's U^{t−τ}).

Fast path: when neurons 2j and 2j+1 share a frequency (always, unless someone loads odd buffers),
the rotation of a pair (v[2j], v[2j+1]) is the complex product (v[2j] + i·v[2j+1])·e^{i·angle}: one
pass over x instead of the five of `rotate` (swap, negate, stack, two products and a sum). The
table e^{i·angle} depends only on (positions, frequencies), so the model builds it once per forward
and shares it across layers (`RotaryTable`).
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


def phase_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of positions and phases: float32 at least, whatever the model's dtype.

    In bf16 the integer 257 is 256 and a frequency keeps 8 bits, so t · freq would be off by whole
    turns at long contexts; float64 stays float64.
    """
    return torch.promote_types(dtype, torch.float32)


def cos_sin(freqs: Tensor, offset: int, T: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the angles at positions offset .. offset+T−1, each (T, N), in at least
    float32 (`phase_dtype`): callers cast them to their activations' dtype."""
    freqs = freqs.reshape(-1)
    freqs = freqs.to(phase_dtype(freqs.dtype))
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
    return RotaryTable(freqs, offset, x.shape[-2]).apply(x)


def is_paired(freqs: Tensor) -> bool:
    """True when neurons 2j and 2j+1 share a frequency, so a pair rotates as one complex number."""
    f = freqs.reshape(-1)
    return f.numel() % 2 == 0 and bool(torch.equal(f[0::2], f[1::2]))


class RotaryTable:
    """The rotation for positions offset .. offset+T−1, built once and applied to many tensors.

    Holds cos/sin (T, N) and, for paired frequencies, e^{i·angle} (T, N/2) for the complex fast
    path. Angles come from `cos_sin`'s `t · freq` product, so every form rotates identically.
    Under torch.compile the pairwise formula is used: the compiler fuses it into one kernel.
    """

    def __init__(self, freqs: Tensor, offset: int, T: int) -> None:
        self.offset, self.T = offset, T
        self.cos, self.sin = cos_sin(freqs, offset, T)  # (T, N) each
        self.phase: Tensor | None = None
        if not torch.compiler.is_compiling() and self.cos.dtype in _COMPLEX and is_paired(freqs):
            self.phase = torch.complex(self.cos[:, 0::2], self.sin[:, 0::2])  # (T, N/2)

    def apply(self, x: Tensor) -> Tensor:
        """rope_t(x_t) for x (..., T, N); the complex product where the dtype allows it."""
        if self.phase is None or x.dtype not in _COMPLEX or torch.compiler.is_compiling():
            return rotate(x, self.cos, self.sin)  # bf16/fp16 have no complex kernels on CPU
        phase = self.phase.to(_COMPLEX[x.dtype])
        x = x.contiguous()
        if x.storage_offset() % 2:  # a complex view must start on a pair boundary
            x = x.clone()
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # (..., T, N/2)
        return torch.view_as_real(pairs * phase).flatten(-2)  # (..., T, N)


_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}
