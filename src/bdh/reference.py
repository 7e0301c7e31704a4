"""SPEC §2 written literally on a reference-layout state dict: the yardstick for tests.

This is deliberately the plain formulation of the reference code (full T×T masked product, rotary
tables recomputed, heads concatenated by a copy) and is independent of `bdh.model`, so that the
model's exactness is checked against something it does not share code with (`frequencies` is
only the initial value of a saved buffer).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bdh.config import BDHConfig
from bdh.ops.rope import frequencies


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


class ReferenceBDH(nn.Module):
    """SPEC §2 written literally as a trainable module: the baseline of `benchmarks/bench_train.py`.

    Same parameter names and shapes as `bdh.BDH` (state dicts load either way) and the reference's
    computation step by step: the full T×T score product masked afterwards, rotary phases
    recomputed in every layer, heads concatenated by a copy before the decoder, `nn.Dropout`.
    """

    def __init__(self, config: BDHConfig) -> None:
        super().__init__()
        self.config = config
        nh, D, N, V = config.n_head, config.n_embd, config.N, config.vocab_size
        self.decoder = nn.Parameter(torch.zeros(nh * N, D).normal_(std=0.02))
        self.encoder = nn.Parameter(torch.zeros(nh, D, N).normal_(std=0.02))
        self.encoder_v = nn.Parameter(torch.zeros(nh, D, N).normal_(std=0.02))
        self.attn = nn.Module()
        self.attn.register_buffer("freqs", frequencies(N).view(1, 1, 1, N))
        self.embed = nn.Embedding(V, D)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.lm_head = nn.Parameter(torch.zeros(D, V).normal_(std=0.02))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        B, T = idx.shape
        nh, D, N = self.encoder.shape
        x = _ln(self.embed(idx).unsqueeze(1))  # (B, 1, T, D)
        for _ in range(self.config.n_layer):
            x_sparse = F.relu(x @ self.encoder)  # (B, nh, T, N)
            qr = _rope(x_sparse, self.attn.freqs)
            y_kv = _ln((qr @ qr.mT).tril(diagonal=-1) @ x)  # (B, nh, T, D)
            y_sparse = F.relu(y_kv @ self.encoder_v)
            xy = self.drop(x_sparse * y_sparse)
            y = _ln(xy.transpose(1, 2).reshape(B, 1, T, N * nh) @ self.decoder)  # (B, 1, T, D)
            x = _ln(x + y)
        logits = x.view(B, T, D) @ self.lm_head
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
