"""The graph model is BDH-Normfree (Eq. 7, neuron residual, no RoPE), layer by layer.

Random tiny weights in float64, 40 tokens: x, y and σ of every layer after every token, and the
logits, of the graph model (bdh.graph) equal those of the tensor equations (bdh.graph.twin), which
in turn equal bdh.BDH's logits and Hebbian state.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.graph import from_tensor, reverse_check, tensor_trace, to_tensor, twin_config
from bdh.graph.convert import extended_decoder, weights_of

T = 40
# Damping values exact in float32, so the model's λ buffer and the graph's u are the same number.
DAMPINGS = [None, [0.875, 0.5]]


def make_model(layernorm: bool, damping=None, std: float = 0.3, seed: int = 0) -> BDH:
    """Tiny neuron-residual, RoPE-free BDH-GPU in float64 with weights ~ N(0, std²)."""
    config = BDHConfig(
        n_layer=3, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0,
        vocab_size=12, residual="neuron", layernorm=layernorm, rope=False, damping=damping,
        attention="naive",
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BDH(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


def token_ids(n: int = T, vocab: int = 12, seed: int = 1) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("damping", DAMPINGS, ids=["no-damping", "damping"])
@pytest.mark.parametrize("layernorm", [False, True], ids=["normfree", "layernorm"])
def test_tensor_trace_is_the_bdh_model(layernorm, damping):
    """The twin's logits are bdh.BDH's logits; its S is the model's Hebbian state after the run."""
    model = make_model(layernorm, damping)
    ids = token_ids()
    twin = tensor_trace(model, ids)
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
        state = model.init_state(1)
        model.step(torch.tensor([ids]), state)
    assert rel_err(twin.logits, logits[0].numpy()) < 1e-11
    model_S = np.stack([S[0].numpy() for S in state.layers])  # (L, nh, N, D)
    assert rel_err(twin.S, model_S) < 1e-11


@pytest.mark.parametrize("layernorm", [False, True], ids=["normfree", "layernorm"])
def test_sigma_is_the_neuron_space_form_of_rho(layernorm):
    """ρ = E σ (Eq. 9): every head's S equals σ restricted to its key neurons, mapped by E_ext."""
    model = make_model(layernorm, [0.875, 0.5])
    twin = tensor_trace(model, token_ids())
    e_ext = extended_decoder(weights_of(model), layernorm)  # (n + V, D)
    N = model.config.N
    for layer in range(model.config.n_layer):
        for h in range(model.config.n_head):
            S = twin.sigma[layer][:, h * N : (h + 1) * N].T @ e_ext
            assert rel_err(S, twin.S[layer, h]) < 1e-11


@pytest.mark.parametrize("damping", DAMPINGS, ids=["no-damping", "damping"])
@pytest.mark.parametrize("layernorm", [False, True], ids=["normfree", "layernorm-gains"])
def test_graph_model_equals_tensor_model_every_layer_and_token(layernorm, damping):
    """x, y, σ after every layer and token, and the logits, to float64 tolerance."""
    model = make_model(layernorm, damping)
    ids = token_ids()
    twin = tensor_trace(model, ids, sigma="every")
    trace = from_tensor(model, layernorm=layernorm).run(ids, sigma="every")
    assert trace.x.shape == twin.x.shape == (3, T, model.config.n)
    assert trace.sigma.shape == twin.sigma.shape == (T, 3, model.config.n + 12, model.config.n)
    for name in ("x", "y", "sigma", "logits"):
        a, b = getattr(trace, name), getattr(twin, name)
        assert rel_err(a, b) < 1e-12, name
    # Per layer too, so a small layer cannot hide behind a large one.
    for layer in range(3):
        assert rel_err(trace.y[layer], twin.y[layer]) < 1e-12
        assert rel_err(trace.sigma[:, layer], twin.sigma[:, layer]) < 1e-12


def test_graph_call_is_the_tensor_call():
    """Same call as bdh.BDH: ids (B, T) in, (logits, loss) out, equal to the model's."""
    model = make_model(layernorm=False, damping=[0.875, 0.5])
    idx = torch.tensor([token_ids(33, seed=2), token_ids(33, seed=3)])
    graph = from_tensor(model)
    logits, loss = graph(idx, targets=idx.roll(-1, 1))
    with torch.no_grad():
        ref, ref_loss = model(idx, targets=idx.roll(-1, 1))
    assert logits.shape == (2, 33, 12)
    assert rel_err(logits.numpy(), ref.numpy()) < 1e-11
    assert abs(loss.item() - ref_loss.item()) < 1e-9 * max(1.0, abs(ref_loss.item()))


def test_graph_call_rejects_bad_ids():
    graph = from_tensor(make_model(layernorm=False))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        graph(torch.tensor([[0, 12]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        graph(torch.tensor([0, 1]))


@pytest.mark.parametrize("layernorm", [False, True])
def test_conversion_splits_exactly_into_excitatory_and_inhibitory(layernorm):
    """Eq. 9 and its reverse check: G^e − G^i = D E_ext, both ≥ 0, disjoint, G_s complete."""
    model = make_model(layernorm)
    report = reverse_check(from_tensor(model, layernorm=layernorm), model)
    assert report["gs_complete"] == 1.0
    for name in ("gx", "gy", "out"):
        assert report[f"{name}_max_abs_error"] < 1e-14
        assert report[f"{name}_min_weight"] >= 0.0
        assert report[f"{name}_both_signs"] == 0.0


def test_to_tensor_recovers_a_tensor_model_with_the_same_function():
    """Reverse direction: a rank-D factorisation of the graphs is a BDH-GPU with equal logits."""
    model = make_model(layernorm=False, damping=[0.875, 0.5])
    graph = from_tensor(model)
    back = to_tensor(graph, n_embd=8)
    assert back.config == twin_config(model.config).replace(attention="naive")
    idx = torch.tensor([token_ids()])
    with torch.no_grad():
        assert rel_err(back(idx)[0].numpy(), model(idx)[0].numpy()) < 1e-9
    with pytest.raises(ValueError, match="rank"):
        to_tensor(graph, n_embd=2)  # G_x, G_y have rank 8
    with pytest.raises(ValueError, match="Normfree"):
        to_tensor(from_tensor(make_model(layernorm=True), layernorm=True), n_embd=8)


def test_sparse_storage_computes_the_same():
    """CSR graphs (sparse=True) give the dense result; thresholding makes fewer edges."""
    model = make_model(layernorm=False)
    ids = token_ids(12)
    dense = from_tensor(model, sparse=False).run(ids)
    sparse_graph = from_tensor(model, sparse=True)
    assert sparse_graph.gx_e.is_sparse
    assert rel_err(sparse_graph.run(ids).logits, dense.logits) < 1e-12
    pruned = from_tensor(model, threshold=0.1)
    assert pruned.gx_e.nnz + pruned.gx_i.nnz < sparse_graph.gx_e.nnz + sparse_graph.gx_i.nnz
