"""Every rule reads and writes only local variables (checked, not assumed).

`LocalOps(check=True)` runs every rule body one neuron / one edge at a time on the *whole* state,
logging each variable access; an access outside the neuron, or outside the edge and its two ends,
raises LocalityError. The vectorised engine is then shown to compute exactly what the bodies do.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from bdh import BDH, BDHConfig
from bdh.graph import EdgeSet, GraphBDH, Layout, LocalityError, Retention, from_tensor
from bdh.graph import rules as graph_rules
from bdh.graph.simulator import local_simulator

# The paper's BDH: every rule except the global LayerNorm gains and the options beyond the paper.
LOCAL_RULES = {
    name
    for name, rule in graph_rules.RULES.items()
    if rule.scope != "global" and name not in graph_rules.OPTIONS
}


def tiny_converted(layernorm: bool = False) -> GraphBDH:
    config = BDHConfig(
        n_layer=2, n_embd=4, n_head=2, mlp_internal_dim_multiplier=2, dropout=0.0, vocab_size=4,
        residual="neuron", layernorm=layernorm, rope=False, damping=[0.75, 0.5],
    )  # fmt: skip
    torch.manual_seed(0)
    model = BDH(config).to(torch.float64)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return from_tensor(model, layernorm=layernorm)


def random_sparse_graph(seed: int = 0) -> GraphBDH:
    """Not a converted model: random sparse e/i graphs, a sparse weighted G_s, per-edge u."""
    rng = np.random.default_rng(seed)
    lay = Layout(n=6, vocab=3, n_head=2, n_layer=2)

    def edges(name: str, rows: int, cols: int, dst0: int = 0) -> EdgeSet:
        scale = 0.3 if name.endswith("_i") else 1.0  # inhibition weaker, so neurons fire
        w = sp.random_array((rows, cols), density=0.5, rng=rng, format="csr") * scale
        return EdgeSet(name, (rows, cols), sp.csr_array(w), 0, dst0)

    src = lay.n_src
    gs = edges("gs", src, lay.n)
    u = rng.uniform(0.5, 1.0, (src, lay.n))
    return GraphBDH(
        layout=lay,
        gx_e=edges("gx_e", src, lay.n), gx_i=edges("gx_i", src, lay.n),
        gy_e=edges("gy_e", src, lay.n), gy_i=edges("gy_i", src, lay.n),
        gs=gs,
        out_e=edges("out_e", lay.n, lay.vocab, lay.n + lay.vocab),
        out_i=edges("out_i", lay.n, lay.vocab, lay.n + lay.vocab),
        retention=Retention(u),
    )  # fmt: skip


TOKENS = [1, 3, 0, 2]


@pytest.mark.parametrize("make", [tiny_converted, random_sparse_graph], ids=["converted", "sparse"])
def test_every_rule_reads_and_writes_only_its_neuron_or_edge(make):
    graph = make()
    sim = local_simulator(graph, check=True)
    sim.run(TOKENS[:3] if make is tiny_converted else TOKENS[:2])
    # Every local rule ran and its accesses were logged (the check is not vacuous) ...
    assert set(sim.ops.applied) == LOCAL_RULES
    touched = {rule for rule, _ in sim.ops.accesses}
    assert touched == LOCAL_RULES
    # ... and the synapse rules really reached the synapses and both ends of their edge.
    assert sim.ops.accesses[("hebb", "sigma")] > 0
    assert sim.ops.accesses[("infer", "X")] > 0 and sim.ops.accesses[("infer", "A")] > 0
    assert sim.ops.accesses[("y_excite", "A")] > 0 and sim.ops.accesses[("y_excite", "Ye")] > 0


def test_normfree_bdh_uses_no_global_step_and_layernorm_only_two():
    sim = local_simulator(tiny_converted(layernorm=False), check=True)
    sim.run(TOKENS[:2])
    assert not {"norm_a", "norm_y"} & set(sim.ops.applied)
    sim = local_simulator(tiny_converted(layernorm=True), check=True)
    sim.run(TOKENS[:2])
    assert {n for n in sim.ops.applied if graph_rules.RULES[n].scope == "global"} == {
        "norm_a",
        "norm_y",
    }


@pytest.mark.parametrize(
    "make",
    [tiny_converted, lambda: tiny_converted(layernorm=True), random_sparse_graph],
    ids=["converted", "layernorm", "sparse"],
)
def test_vectorised_rounds_compute_what_the_local_rules_compute(make):
    graph = make()
    local = local_simulator(graph).run(TOKENS, sigma="every")
    fast = graph.run(TOKENS, sigma="every")
    for name in ("x", "y", "sigma", "logits"):
        a, b = getattr(fast, name), getattr(local, name)
        assert np.abs(a - b).max() <= 1e-12 * max(np.abs(b).max(), 1.0), name
    assert np.abs(fast.y).max() > 0 and np.abs(fast.sigma).max() > 0  # something happened


def _leaky_fire_x(s, j):  # reads a neighbour's integrator: not local
    s.X[j] += max(s.Xe[(j + 1) % 4] - s.Xi[j], 0.0)


def _leaky_hebb(s, i, j):  # writes the synapse of another edge: not local
    s.sigma[i, (j + 1) % 4] += s.w[i, j] * s.Y[i] * s.X[j]


def _leaky_infer(s, i, j):  # reads a third neuron's X: not local
    s.A[s.head[j], i] += s.sigma[i, j] * s.X[(j + 1) % 4]


@pytest.mark.parametrize(
    "name, body", [("fire_x", _leaky_fire_x), ("hebb", _leaky_hebb), ("infer", _leaky_infer)]
)
def test_the_checker_catches_non_local_rules(monkeypatch, name, body):
    rule = graph_rules.RULES[name]
    monkeypatch.setitem(graph_rules.RULES, name, rule.__class__(**{**rule.__dict__, "body": body}))
    with pytest.raises(LocalityError, match=name):
        local_simulator(tiny_converted(), check=True).run(TOKENS[:2])
