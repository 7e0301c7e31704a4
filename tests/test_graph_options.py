"""Options beyond the paper's BDH: with RoPE and the reference's d-space residual as local rules
(and LayerNorms as global gains), a graph computes exactly what any BDH-GPU checkpoint computes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.graph import from_tensor, to_tensor
from bdh.graph import rules as graph_rules
from bdh.graph.convert import extended_decoder, weights_of
from bdh.graph.simulator import local_simulator


def make_model(seed: int = 0, std: float = 0.3, **options) -> BDH:
    config = BDHConfig(
        n_layer=3, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0,
        vocab_size=12, damping=[0.875, 0.5], attention="naive", **options,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = BDH(config).to(torch.float64).eval()
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder, model.embed.weight):
            p.normal_(0.0, std)
    return model


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


IDS = np.random.default_rng(3).integers(0, 12, 40).tolist()
COMBOS = list(itertools.product([True, False], [True, False], ["reference", "neuron"]))


@pytest.mark.parametrize(("layernorm", "rope", "residual"), COMBOS)
def test_exact_conversion_equals_the_model_in_every_configuration(layernorm, rope, residual):
    model = make_model(layernorm=layernorm, rope=rope, residual=residual)
    graph = from_tensor(model, exact=True)
    with torch.no_grad():
        ref = model(torch.tensor([IDS]))[0][0].numpy()
    assert rel_err(graph.run(IDS, sigma="none").logits, ref) < 1e-10


def test_the_reference_model_synapses_are_rho():
    """Default BDH-GPU (RoPE, d-space residual, LN): every head's S is σ of its keys mapped by E."""
    model = make_model()  # the reference's options
    trace = from_tensor(model, exact=True).run(IDS)
    state = model.init_state(1)
    with torch.no_grad():
        model.step(torch.tensor([IDS]), state)
    e_ext = extended_decoder(weights_of(model), layernorm=True)
    N = model.config.N
    for layer, S in enumerate(state.layers):
        for h in range(model.config.n_head):
            from_sigma = trace.sigma[layer][:, h * N : (h + 1) * N].T @ e_ext
            assert rel_err(from_sigma, S[0, h].numpy()) < 1e-10


def tiny_reference_graph():
    config = BDHConfig(
        n_layer=2, n_embd=4, n_head=2, mlp_internal_dim_multiplier=2, dropout=0.0, vocab_size=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BDH(config).to(torch.float64)
    with torch.no_grad():
        for p in (model.encoder, model.encoder_v, model.decoder, model.embed.weight):
            p.normal_(0.0, 0.5)
    return from_tensor(model, exact=True)


def test_option_rules_are_local_and_the_vector_rounds_match_them():
    graph = tiny_reference_graph()
    sim = local_simulator(graph, check=True)
    local = sim.run([1, 3, 0])
    applied = set(sim.ops.applied)
    assert set(graph_rules.OPTIONS) <= applied
    assert {n for n in applied if graph_rules.RULES[n].scope == "global"} == {
        "norm_a",
        "norm_y",
        "norm_z",
    }
    fast = graph.run([1, 3, 0])
    for name in ("x", "y", "sigma", "logits"):
        a, b = getattr(fast, name), getattr(local, name)
        assert np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1.0), name


def test_only_the_papers_bdh_has_a_tensor_form_by_factorisation():
    import re

    with pytest.raises(ValueError, match=re.escape("paper's BDH")):
        to_tensor(tiny_reference_graph(), n_embd=4)
