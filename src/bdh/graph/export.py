"""Export the neuron graphs (thresholded G_x, G_y and synapse states σ) for networkx, igraph, Gephi.

Each graph is written as GraphML (node attributes `kind`, `head`, `token`; edge attributes `weight`
and `sign`) and as a plain edge list (`source target weight` per line, `#` comments). Edges go i → j
as in the paper's Table 1: for G_x and G_y the signed weight G^e − G^i (so one file holds both the
excitatory and the inhibitory circuit), for σ_l the synapse from value-side i to key-side j.

    G = neuron_graph(graph, "gx", threshold=0.05)            # networkx.DiGraph
    export_graphs(graph, "out/", threshold=0.05, sigma=trace.sigma)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bdh.graph.simulator import GraphBDH

if TYPE_CHECKING:
    import networkx as nx


def _networkx() -> Any:
    """networkx is an optional extra: import it where a graph is built, with a clear error."""
    try:
        import networkx
    except ImportError:
        raise ImportError(
            "exporting neuron graphs needs networkx: pip install 'bdh[graph]'"
        ) from None
    return networkx


KINDS = ("gx", "gy", "sigma")


def signed_weights(graph: GraphBDH, which: str, sigma: np.ndarray | None = None) -> np.ndarray:
    """(n + V, n) weights of G_x or G_y (excitatory minus inhibitory), or a σ_l passed in."""
    if which == "sigma":
        if sigma is None:
            raise ValueError("which='sigma' needs the σ of one layer, e.g. trace.sigma[layer]")
        return np.asarray(sigma)
    if which not in KINDS:
        raise ValueError(f"which must be one of {KINDS}, got {which!r}")
    return graph.graph(f"{which}_e").dense() - graph.graph(f"{which}_i").dense()


def kept_edges(
    w: np.ndarray, threshold: float, max_edges: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and weights of the edges with |w| ≥ threshold (the strongest max_edges)."""
    rows, cols = np.nonzero((np.abs(w) >= threshold) & (w != 0))
    vals = w[rows, cols]
    if max_edges is not None and vals.size > max_edges:
        top = np.argsort(-np.abs(vals), kind="stable")[:max_edges]
        rows, cols, vals = rows[top], cols[top], vals[top]
    return rows, cols, vals


def neuron_graph(
    graph: GraphBDH,
    which: str,
    threshold: float = 0.0,
    sigma: np.ndarray | None = None,
    include_sensory: bool = False,
    max_edges: int | None = None,
) -> nx.DiGraph:
    """A networkx DiGraph of the neurons (and, if asked, the sensory neurons) and strong edges."""
    lay = graph.layout
    w = signed_weights(graph, which, sigma)
    if not include_sensory:
        w = w[: lay.n]
    rows, cols, vals = kept_edges(w, threshold, max_edges)
    G = _networkx().DiGraph(name=which, threshold=float(threshold))
    head = lay.head()
    for i in range(w.shape[0]):
        if i < lay.n:
            G.add_node(i, kind="neuron", head=int(head[i]))
        else:
            G.add_node(i, kind="sensory", head=-1, token=i - lay.n)
    G.add_edges_from(
        (int(i), int(j), {"weight": float(v), "sign": "excitatory" if v > 0 else "inhibitory"})
        for i, j, v in zip(rows, cols, vals, strict=True)
    )
    return G


def write_edgelist(G: nx.DiGraph, path: str | Path) -> Path:
    """`source target weight` per line, after a `#` header naming the graph and threshold."""
    path = Path(path)
    lines = [f"# {G.graph.get('name', '')} threshold={G.graph.get('threshold', 0.0)}"]
    lines.append("# source target weight")
    lines += [f"{i} {j} {d['weight']:.9g}" for i, j, d in G.edges(data=True)]
    path.write_text("\n".join(lines) + "\n")
    return path


def export_graphs(
    graph: GraphBDH,
    out_dir: str | Path,
    threshold: float = 0.0,
    sigma: np.ndarray | None = None,
    include_sensory: bool = False,
    max_edges: int | None = None,
) -> list[Path]:
    """Write gx, gy (and sigma_l for each layer of `sigma`, (L, n + V, n)) as .graphml, .edges."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs: list[tuple[str, str, np.ndarray | None]] = [("gx", "gx", None), ("gy", "gy", None)]
    if sigma is not None:
        jobs += [(f"sigma_{layer + 1}", "sigma", s) for layer, s in enumerate(sigma)]
    written = []
    for stem, which, s in jobs:
        G = neuron_graph(graph, which, threshold, s, include_sensory, max_edges)
        G.graph["name"] = stem
        _networkx().write_graphml(G, out / f"{stem}.graphml")
        written += [out / f"{stem}.graphml", write_edgelist(G, out / f"{stem}.edges")]
    return written
