"""σ (Eq. 6/16): the fast trajectories and matrices against a literal loop, and against the
model's own attention state and read."""

from __future__ import annotations

import math

import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.interpret.synapses import synapse_matrices, synapse_trajectories, synapses
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


# ---------------------------------------------------------------- on the model


def _graph_model(rope: bool, seed: int = 0, damping=None) -> BDH:
    """BDH-Normfree with the neuron residual (Eq. 7-8), float64, weights large enough that the
    activations neither vanish nor explode over two layers."""
    config = BDHConfig.from_name(
        "tiny", n_layer=3, residual="neuron", rope=rope, layernorm=False, damping=damping
    )
    torch.manual_seed(seed)
    model = BDH(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.15)
    return model


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("damping", [None, [0.7, 0.95]])
def test_E_sigma_is_the_models_attention_state(damping):
    """ρ = E σ (SPEC §5.1): without rotation, S_l (N × D per head) = σᵀ E, to float64 rounding;
    with damping, both decay by the head's λ per token."""
    model = _graph_model(rope=False, damping=damping)
    idx = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    state = model.init_state(batch_size=2)
    with torch.no_grad():
        model(idx, state=state)
    for layer in (1, 2):
        for head in range(model.config.n_head):
            sigma = synapses(model, idx, layer, head)[:, 0]  # (B, n, N) after the last token
            S = state.layers[layer][:, head]  # (B, N, D)
            assert S.abs().max() > 1e-3  # not a comparison of zeros
            assert _relative(sigma.mT @ model.decoder.detach(), S) < 1e-10


def test_rotary_sigma_is_what_the_next_token_reads():
    """With U: the model's attention read at t+1 is Σ_ij x_{t+1}(j) σ_t(i, j) E(i, :)."""
    model = _graph_model(rope=True)
    idx = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(2))
    layer, head, T = 2, 1, idx.shape[1]
    with torch.no_grad():
        _, cache = model.run_with_cache(idx, names=[f"layers.{layer}.a", f"layers.{layer}.x"])
    sigma = synapses(model, idx, layer, head, times=range(T - 1))  # (B, T−1, n, N)
    x = cache["x", layer][:, head, 1:]  # (B, T−1, N): the reader of σ_t is token t+1
    E = model.decoder.detach()
    read = torch.einsum("btj,btij,id->btd", x, sigma, E)
    a = cache["a", layer][:, head, 1:]
    assert a.abs().max() > 1e-3
    assert _relative(read, a) < 1e-10
    plain = synapses(model, idx, layer, head, times=range(T - 1), rope=False)
    assert _relative(torch.einsum("btj,btij,id->btd", x, plain, E), a) > 1e-3


def test_pairs_follow_the_full_matrices_of_a_trained_style_model():
    """The reference model (LayerNorm, d-space residual, rotary): trajectories of chosen pairs
    are the entries of the full matrices at every time."""
    torch.manual_seed(0)
    model = BDH(BDHConfig.from_name("tiny", n_layer=3))
    idx = torch.randint(0, 256, (1, 17))
    n, N = model.config.n, model.config.N
    pairs = [(0, 0), (n - 1, N - 1), (5, 3), (N + 2, 4)]
    traj = synapses(model, idx, 2, 1, pairs)  # (1, T, P)
    full = synapses(model, idx, 2, 1, times=range(17))  # (1, T, n, N)
    want = torch.stack([full[0, :, i, j] for i, j in pairs], dim=-1)
    torch.testing.assert_close(traj[0], want, rtol=0, atol=1e-12)
    assert traj.abs().max() > 0


def test_model_level_mistakes_are_named():
    model = BDH(BDHConfig.from_name("tiny"))
    idx = torch.randint(0, 256, (1, 5))
    with pytest.raises(ValueError, match="layer 0 has no synapse state"):
        synapses(model, idx, 0, 0)
    with pytest.raises(ValueError, match="head 7"):
        synapses(model, idx, 1, 7)
    with pytest.raises(ValueError, match="either pairs"):
        synapses(model, idx, 1, 0, [(0, 0)], times=[1])
    with pytest.raises(ValueError, match="over the limit"):
        synapses(model, idx, 1, 0, times=[0, 1, 2], max_elements=1000)
