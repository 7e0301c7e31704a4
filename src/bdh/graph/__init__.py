"""BDH, the graph model: neurons and synapses running local rules (SPEC §4, paper §2, Eqs. 6–9).

    graph = from_tensor(model)                 # G_x = D_x E, G_y = D_y E split into e/i (Eq. 9)
    logits, loss = graph(idx, targets)         # same call as bdh.BDH
    trace = graph.run(tokens, sigma="every")   # x, y, σ of every layer and token
    twin = tensor_trace(model, tokens)         # the same quantities from the tensor equations

See docs/graph-model.md for the map from every rule to the code and to the paper.
"""

from bdh.graph.convert import from_tensor, reverse_check, to_tensor, twin_config
from bdh.graph.edges import EdgeSet, Layout, Retention, Synapses
from bdh.graph.engine import LocalityError, LocalOps, VectorOps
from bdh.graph.export import export_graphs, neuron_graph
from bdh.graph.simulator import GraphBDH, Simulator, Trace, local_simulator
from bdh.graph.spiking import SpikingOps, measure_convergence, spiking_run
from bdh.graph.twin import TensorTrace, tensor_trace

__all__ = [
    "EdgeSet",
    "GraphBDH",
    "Layout",
    "LocalOps",
    "LocalityError",
    "Retention",
    "Simulator",
    "SpikingOps",
    "Synapses",
    "TensorTrace",
    "Trace",
    "VectorOps",
    "export_graphs",
    "from_tensor",
    "local_simulator",
    "measure_convergence",
    "neuron_graph",
    "reverse_check",
    "spiking_run",
    "tensor_trace",
    "to_tensor",
    "twin_config",
]
