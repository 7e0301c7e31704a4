"""The synapse state σ of BDH (paper Eq. 6 and 16, SPEC §5.1), read from the tensor model.

Notation: B batch, T tokens, nh heads, N neurons per head, n = nh·N, D = n_embd, P pairs,
K chosen times. Layer l ≥ 1 and head h; i indexes the n neurons of layer l−1's y (all heads,
head-major: neuron k of head g is i = g·N + k, the row order of E), j the N neurons of head h's x.

    σ_t(i, j) = Σ_{τ≤t} λ^{t−τ} · y_{τ,l−1}(i) · [U^{t+1−τ} x_{τ,l}](j)

- Without the rotary factor (`rope=False`) this is the plain Hebbian count Σ_τ y(i)·x(j).
- With it (`rope=True`), U is the model's own rotation: x_τ is rotated by the angle of the
  position difference τ − (t+1), i.e. `rope_{τ−t−1}(x_τ)`, which mixes j with its pair partner
  j ^ 1 (neurons 2m and 2m+1 share a frequency). This is Eq. 6, σ_t = (σ_{t−1} + y_t x_tᵀ) U:
  σ after token t is the state as the *next* token reads it, with its plain, unrotated x. Since
  ⟨rope_{t+1} q, rope_τ k⟩ = ⟨q, rope_{τ−t−1} k⟩, the model's attention read at t+1 is then
  exactly a_{t+1} = Σ_{i,j} x_{t+1}(j) σ_t(i, j) E(i, :) whenever its values are v = E y (the
  neuron residual without LayerNorm); a rotated synapse may be negative. SPEC §5.1 writes the same
  thing as σ_{t−1} = Σ_{τ<t} y x U^{t−τ}.
- λ is the head's damping (1 without): the model's state decays the same way.

The model never forms σ (n × N per head): its state is the compression S_l = (E σ)ᵀ, rotated to
absolute positions (SPEC §3). Here σ is rebuilt from captured activations. Trajectories of chosen
synapses cost O(T·P) after the forward pass, never an n × N matrix per token; full matrices are
built only at chosen times, incrementally (O(T·n·N) in all), under a size limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from bdh.ops.rope import cos_sin, rotate

# Full σ matrices are B·K·n·N numbers; above this many (256 MiB in float64) we refuse.
MAX_ELEMENTS = 2**25

Pairs = Tensor | Sequence[tuple[int, int]]


# ---------------------------------------------------------------------------- from a model


@torch.no_grad()
def synapses(
    model: Any,
    idx: Tensor,
    layer: int,
    head: int,
    pairs: Pairs | None = None,
    *,
    times: Sequence[int] | None = None,
    rope: bool | None = None,
    dtype: torch.dtype = torch.float64,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """σ of `layer` (≥ 1) and `head` while the model reads idx (T,) or (B, T) from an empty state.

    With `pairs` ((P, 2) of (i, j), i < n over layer−1's y, j < N over head's x): the trajectory
    of those synapses after every token, (B, T, P). Without: the full matrices (B, K, n, N) after
    the tokens at `times` (default: the last one), when B·K·n·N ≤ max_elements.
    `rope` None follows the model's config; False gives the plain Hebbian count. Activations
    are taken through `model.run_with_cache` in eval mode (no dropout) and summed in `dtype`.
    """
    config = model.config
    _check_layer_head(layer, head, config.n_layer, config.n_head)
    idx = idx[None] if idx.dim() == 1 else idx
    y_prev, x = _activations(model, idx, layer, head, dtype)
    use_rope = config.rope if rope is None else rope
    freqs = model.attn.freqs.reshape(-1) if use_rope else None
    damping = model.attn.damping  # the model's own λ_h (a float32 buffer unless cast)
    lam = 1.0 if damping is None else float(damping[head])
    if pairs is not None:
        if times is not None:
            raise ValueError("give either pairs (trajectories) or times (full matrices), not both")
        return synapse_trajectories(y_prev, x, pairs, freqs, lam)
    times = [idx.shape[1] - 1] if times is None else times
    return synapse_matrices(y_prev, x, times, freqs, lam, max_elements)


def _check_layer_head(layer: int, head: int, n_layer: int, n_head: int) -> None:
    if not 1 <= layer < n_layer:
        raise ValueError(
            f"layer {layer} has no synapse state σ: it needs y of the layer before it,"
            f" choose 1 ≤ layer < {n_layer}"
        )
    if not 0 <= head < n_head:
        raise ValueError(f"head {head} is outside [0, {n_head})")


def _activations(
    model: Any, idx: Tensor, layer: int, head: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """y of layer−1, heads concatenated (B, T, n), and x of layer's head (B, T, N)."""
    names = [f"layers.{layer - 1}.y", f"layers.{layer}.x"]
    was_training = model.training
    model.eval()  # y is observed before dropout, but dropout would also change what follows
    try:
        _, cache = model.run_with_cache(idx, names=names, dtype=dtype)
    finally:
        model.train(was_training)
    y_prev = cache["y", layer - 1].transpose(1, 2).flatten(2)  # (B, T, nh·N), head-major
    return y_prev, cache["x", layer][:, head]


# ---------------------------------------------------------------------------- from activations


def synapse_trajectories(
    y_prev: Tensor, x: Tensor, pairs: Pairs, freqs: Tensor | None = None, damping: float = 1.0
) -> Tensor:
    """σ_t(i, j) for every t and each pair: y_prev (B, T, n), x (B, T, N) → (B, T, P).

    Without rotation a pair's trajectory is a (decayed) cumulative sum of y(i)·x(j). With it,
    the sum runs in absolute positions (keys rotated by rope_τ, as the model stores them), for
    j and its pair partner, and each prefix sum is then rotated back by −(t+1).
    """
    _check_activations(y_prev, x)
    pairs = _check_pairs(pairs, y_prev.shape[-1], x.shape[-1], x.device)
    i, j = pairs[:, 0], pairs[:, 1]
    yi = y_prev[..., i]  # (B, T, P)
    if freqs is None:
        return _decayed_cumsum(yi * x[..., j], damping)
    freqs = freqs.reshape(-1).to(x.dtype)
    k = _absolute_keys(x, freqs)  # (B, T, N)
    own = _decayed_cumsum(yi * k[..., j], damping)
    partner = _decayed_cumsum(yi * k[..., j ^ 1], damping)
    T = x.shape[1]
    cos, sin = cos_sin(freqs, -T, T)  # positions −T .. −1
    cos, sin = cos.flip(0)[:, j], sin.flip(0)[:, j]  # row t: position −(t+1), (T, P)
    sign = torch.where(j % 2 == 0, -1.0, 1.0).to(x.dtype)  # rope: out[2m] = v[2m]cos − v[2m+1]sin
    return own * cos + sign * partner * sin


def synapse_matrices(
    y_prev: Tensor,
    x: Tensor,
    times: Sequence[int],
    freqs: Tensor | None = None,
    damping: float = 1.0,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """The full σ_t (n × N) after each token in `times`: y_prev (B, T, n), x (B, T, N) →
    (B, K, n, N), built incrementally over the sorted times (one pass over the tokens)."""
    _check_activations(y_prev, x)
    (B, T, n), N = y_prev.shape, x.shape[-1]
    ts = _check_times(times, T)
    if B * len(ts) * n * N > max_elements:
        raise ValueError(
            f"{B}×{len(ts)} σ matrices of {n}×{N} synapses are {B * len(ts) * n * N:,} numbers,"
            f" over the limit of {max_elements:,}: ask for fewer times or for chosen pairs"
        )
    if freqs is not None:
        freqs = freqs.reshape(-1).to(x.dtype)
        x = _absolute_keys(x, freqs)
    out = x.new_empty(B, len(ts), n, N)
    A, last = x.new_zeros(B, n, N), -1  # the state after token `last`, absolute positions
    for t in sorted(set(ts)):
        w = damping ** torch.arange(t - last - 1, -1, -1, dtype=x.dtype, device=x.device)
        A = (
            damping ** (t - last) * A
            + (y_prev[:, last + 1 : t + 1] * w[:, None]).mT @ x[:, last + 1 : t + 1]
        )
        S = A if freqs is None else _rotate_back(A, freqs, t + 1)
        for k, tk in enumerate(ts):
            if tk == t:
                out[:, k] = S
        last = t
    return out


def _absolute_keys(x: Tensor, freqs: Tensor) -> Tensor:
    """rope_τ(x_τ) at positions 0 .. T−1: the keys exactly as the model writes them."""
    cos, sin = cos_sin(freqs, 0, x.shape[-2])
    return rotate(x, cos, sin)


def _rotate_back(A: Tensor, freqs: Tensor, p: int) -> Tensor:
    """rope_{−p} applied along the N axis of A (B, n, N)."""
    cos, sin = cos_sin(freqs, -p, 1)  # (1, N): broadcast over the n rows
    return rotate(A, cos, sin)


def _decayed_cumsum(z: Tensor, damping: float) -> Tensor:
    """out_t = λ·out_{t−1} + z_t along dim 1 (a plain cumulative sum when λ = 1)."""
    if damping == 1.0:
        return z.cumsum(1)
    out = torch.empty_like(z)
    acc = torch.zeros_like(z[:, 0])
    for t in range(z.shape[1]):  # λ^{−t} rescaling would overflow on long streams
        acc = damping * acc + z[:, t]
        out[:, t] = acc
    return out


def _check_activations(y_prev: Tensor, x: Tensor) -> None:
    if y_prev.dim() != 3 or x.dim() != 3 or y_prev.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"need y_prev (B, T, n) and x (B, T, N) over the same tokens, got"
            f" {tuple(y_prev.shape)} and {tuple(x.shape)}"
        )


def _check_pairs(pairs: Pairs, n: int, N: int, device: torch.device) -> Tensor:
    p = torch.as_tensor(pairs, dtype=torch.long, device=device)
    if p.dim() != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"pairs must be a non-empty (P, 2) list of (i, j), got {tuple(p.shape)}")
    bad_i = p[(p[:, 0] < 0) | (p[:, 0] >= n), 0]
    bad_j = p[(p[:, 1] < 0) | (p[:, 1] >= N), 1]
    if bad_i.numel():
        raise ValueError(f"synapse source i = {int(bad_i[0])} is outside [0, n = {n})")
    if bad_j.numel():
        raise ValueError(f"synapse target j = {int(bad_j[0])} is outside [0, N = {N})")
    return p


def _check_times(times: Sequence[int], T: int) -> list[int]:
    ts = [int(t) for t in times]
    if not ts:
        raise ValueError("times is empty: give at least one token position")
    for t in ts:
        if not 0 <= t < T:
            raise ValueError(f"time {t} is outside the {T} tokens read [0, {T})")
    return ts
