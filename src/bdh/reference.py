"""SPEC §2 written literally on a reference-layout state dict: the yardstick for tests.

This is deliberately the plain formulation of the reference code (full T×T masked product, rotary
tables recomputed, heads concatenated by a copy) and is independent of `bdh.model`, so that the
model's exactness is checked against something it does not share code with.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5)


def _rope(x: Tensor, freqs: Tensor) -> Tensor:
    T = x.shape[-2]
    phases = torch.arange(T, device=x.device, dtype=freqs.dtype).view(1, 1, -1, 1) * freqs
    phases = (phases % 1) * (2 * math.pi)
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(*x.size())
    return x * torch.cos(phases) + rotated * torch.sin(phases)


def reference_forward(sd: dict[str, Tensor], idx: Tensor, n_layer: int) -> Tensor:
    """Logits (B, T, V) of the reference BDH-GPU in eval mode (no dropout) for token ids (B, T)."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    enc, enc_v, dec = sd["encoder"], sd["encoder_v"], sd["decoder"]
    nh, D, N = enc.shape
    B, T = idx.shape
    x = _ln(F.embedding(idx, sd["embed.weight"]).unsqueeze(1))  # (B, 1, T, D)
    for _ in range(n_layer):
        x_sparse = F.relu(x @ enc)  # (B, nh, T, N)
        qr = _rope(x_sparse, sd["attn.freqs"])
        y_kv = _ln((qr @ qr.mT).tril(diagonal=-1) @ x)  # (B, nh, T, D)
        y_sparse = F.relu(y_kv @ enc_v)
        xy = x_sparse * y_sparse
        y = _ln(xy.transpose(1, 2).reshape(B, 1, T, N * nh) @ dec)  # (B, 1, T, D)
        x = _ln(x + y)
    return x.view(B, T, D) @ sd["lm_head"]
