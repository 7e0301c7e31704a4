"""σ (Eq. 6/16): the fast trajectories and matrices against a literal loop, and against the
model's own attention state and read."""

from __future__ import annotations

import math

import pytest
import torch

from bdh.interpret.synapses import synapse_matrices, synapse_trajectories
from bdh.ops import frequencies


def brute_sigma(y_prev, x, t, freqs=None, damping=1.0):
    """σ_t (B, n, N) written literally: Σ_{τ≤t} λ^{t−τ} y_τ(i) [U^{t+1−τ} x_τ](j), one τ and one
    pair of neurons at a time, the rotation by angle 2π·(τ−t−1)·freq from its definition."""
    B, _, n = y_prev.shape
    N = x.shape[-1]
    sigma = torch.zeros(B, n, N, dtype=torch.float64)
    for tau in range(t + 1):
        xr = x[:, tau].clone()
        if freqs is not None:
            for m in range(0, N, 2):
                phi = 2 * math.pi * (tau - t - 1) * float(freqs[m])
                c, s = math.cos(phi), math.sin(phi)
                xr[:, m] = x[:, tau, m] * c - x[:, tau, m + 1] * s
                xr[:, m + 1] = x[:, tau, m + 1] * c + x[:, tau, m] * s
        sigma += damping ** (t - tau) * y_prev[:, tau, :, None] * xr[:, None, :]
    return sigma


def _activations(B=2, T=9, n=12, N=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.relu(torch.randn(B, T, n, generator=g, dtype=torch.float64))
    x = torch.relu(torch.randn(B, T, N, generator=g, dtype=torch.float64))
    return y, x


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("damping", [1.0, 0.8])
def test_matrices_and_trajectories_equal_the_literal_sum(rope, damping):
    y, x = _activations()
    T, n, N = y.shape[1], y.shape[2], x.shape[2]
    # Large frequencies so that every pair turns visibly over 9 tokens.
    freqs = frequencies(N, theta=4.0).double() if rope else None
    times = [T - 1, 0, 4]
    mats = synapse_matrices(y, x, times, freqs, damping)
    pairs = [(i, j) for i in range(n) for j in range(N)]
    traj = synapse_trajectories(y, x, pairs, freqs, damping)  # (B, T, n·N)
    for t in range(T):
        want = brute_sigma(y, x, t, freqs, damping)
        torch.testing.assert_close(traj[:, t].view(-1, n, N), want, rtol=0, atol=1e-12)
        if t in times:
            torch.testing.assert_close(mats[:, times.index(t)], want, rtol=0, atol=1e-12)


def test_rotation_changes_sigma_and_can_make_it_negative():
    y, x = _activations()
    freqs = frequencies(x.shape[-1], theta=4.0).double()
    plain = synapse_matrices(y, x, [8])
    turned = synapse_matrices(y, x, [8], freqs)
    assert plain.min() >= 0 and turned.min() < 0


def test_bad_arguments_are_named():
    y, x = _activations()
    with pytest.raises(ValueError, match="source i = 12"):
        synapse_trajectories(y, x, [(12, 0)])
    with pytest.raises(ValueError, match="target j = -1"):
        synapse_trajectories(y, x, [(0, -1)])
    with pytest.raises(ValueError, match="time 9 is outside"):
        synapse_matrices(y, x, [9])
    with pytest.raises(ValueError, match="over the limit"):
        synapse_matrices(y, x, [1, 2], max_elements=2 * 12 * 6)
    with pytest.raises(ValueError, match="same tokens"):
        synapse_matrices(y, x[:, :3], [1])
