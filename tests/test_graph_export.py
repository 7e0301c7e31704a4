"""Export of the neuron graphs: thresholded G_x, G_y, σ to GraphML and an edge list (networkx)."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from bdh import BDH, BDHConfig
from bdh.graph import from_tensor
from bdh.graph.export import export_graphs, neuron_graph, signed_weights


@pytest.fixture(scope="module")
def graph():
    config = BDHConfig(
        n_layer=2, n_embd=8, n_head=2, mlp_internal_dim_multiplier=4, dropout=0.0,
        vocab_size=6, residual="neuron", layernorm=False, rope=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BDH(config).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return from_tensor(model)


def test_threshold_keeps_exactly_the_strong_signed_edges(graph):
    w = signed_weights(graph, "gx")[: graph.layout.n]
    G = neuron_graph(graph, "gx", threshold=0.2)
    assert G.number_of_nodes() == graph.layout.n
    assert G.number_of_edges() == int((np.abs(w) >= 0.2).sum())
    for i, j, d in G.edges(data=True):
        assert d["weight"] == pytest.approx(w[i, j])
        assert d["sign"] == ("excitatory" if w[i, j] > 0 else "inhibitory")
    assert {d["head"] for _, d in G.nodes(data=True)} == {0, 1}


def test_max_edges_keeps_the_strongest(graph):
    G = neuron_graph(graph, "gy", max_edges=10)
    w = np.abs(signed_weights(graph, "gy")[: graph.layout.n])
    assert G.number_of_edges() == 10
    assert min(abs(d["weight"]) for *_, d in G.edges(data=True)) == pytest.approx(
        np.sort(w.ravel())[-10]
    )


def test_files_round_trip_through_networkx(graph, tmp_path):
    trace = graph.run([1, 2, 3, 4])
    paths = export_graphs(graph, tmp_path, threshold=0.1, sigma=trace.sigma, include_sensory=True)
    assert sorted(p.name for p in paths) == sorted(
        f"{s}.{e}" for s in ("gx", "gy", "sigma_1", "sigma_2") for e in ("graphml", "edges")
    )
    original = neuron_graph(graph, "gx", threshold=0.1, include_sensory=True)
    loaded = nx.read_graphml(tmp_path / "gx.graphml", node_type=int)
    assert set(loaded.edges) == set(original.edges)
    assert loaded.nodes[graph.layout.n]["kind"] == "sensory"
    rows = np.loadtxt(tmp_path / "gx.edges", comments="#", ndmin=2)
    w = signed_weights(graph, "gx")
    assert len(rows) == original.number_of_edges()
    np.testing.assert_allclose(rows[:, 2], w[rows[:, 0].astype(int), rows[:, 1].astype(int)])
    sigma = nx.read_graphml(tmp_path / "sigma_2.graphml", node_type=int)
    assert sigma.number_of_edges() == int((trace.sigma[1] >= 0.1).sum())


def test_sigma_needs_a_state(graph):
    with pytest.raises(ValueError, match="sigma"):
        neuron_graph(graph, "sigma")
    with pytest.raises(ValueError, match="which"):
        neuron_graph(graph, "gz")


def test_the_graph_package_imports_without_networkx():
    """networkx is the optional `graph` extra: only building an exported graph needs it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['networkx'] = None\n"
        "import bdh.graph\n"
        "from bdh.graph.export import _networkx\n"
        "try:\n    _networkx()\nexcept ImportError as e:\n    print(e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'bdh[graph]'" in done.stdout
