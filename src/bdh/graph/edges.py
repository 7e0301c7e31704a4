"""Nodes, weighted edges and synapses of the graph model (SPEC §4), stored dense or sparse.

Node layout (global ids), the same for every layer:

    [0, n)          neurons: the paper's n particles, head-major (neuron j belongs to head j // N)
    [n, n + V)      sensory neurons: one per token id; the presented token fires with Y = 1
    [n + V, n + 2V) output neurons: integrate y_L into the logits (the read-out of Eq. 7)

The sensory neurons make the token embedding a graph too: they are the columns of E that carry
v_0 (E_ext = [E | embedding], so G_x = D_x E_ext sends token spikes into the x-path of layer 1).

A graph `EdgeSet` stores W[i, j] = weight of the directed edge i → j (the paper's table convention
G(i, j)); the tensor equations use the transpose (x = (G_x y)⁺ with G_x = D_x E, i.e. W = Gᵀ).
Dense graphs (what low-rank conversion gives) are numpy arrays; thresholded or random graphs are
scipy CSR arrays, so memory follows the number of edges.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.linalg import blas

Matrix = np.ndarray | sp.csr_array

# Below this fraction of non-zero entries a graph is stored sparsely.
SPARSE_DENSITY = 0.25
# Below this fraction of active senders, a dense push reads only the active rows.
ACTIVE_SUBSET = 0.1


@dataclass(frozen=True)
class Layout:
    """Sizes and static per-node attributes; nodes are numbered as in the module docstring."""

    n: int  # neurons (all heads)
    vocab: int  # V: sensory and output neurons
    n_head: int
    n_layer: int

    @property
    def N(self) -> int:  # the paper's symbol
        return self.n // self.n_head

    @property
    def n_src(self) -> int:
        """Nodes that can send along G_x, G_y and G_s: neurons and sensory neurons."""
        return self.n + self.vocab

    @property
    def n_nodes(self) -> int:
        return self.n + 2 * self.vocab

    @property
    def sensory(self) -> slice:
        return slice(self.n, self.n + self.vocab)

    @property
    def outputs(self) -> slice:
        return slice(self.n + self.vocab, self.n_nodes)

    def head(self) -> np.ndarray:
        """head[j] for every node; -1 for sensory and output neurons (they belong to no head)."""
        h = np.full(self.n_nodes, -1, dtype=np.int64)
        h[: self.n] = np.arange(self.n) // self.N
        return h

    def head_onehot(self, dtype: np.dtype) -> np.ndarray:
        """(n, nh) indicator of each neuron's head, to route messages into A's compartments."""
        return np.eye(self.n_head, dtype=dtype)[np.arange(self.n) // self.N]


def as_storage(w: np.ndarray, sparse: bool | None = None) -> Matrix:
    """Keep `w` dense, or convert it to CSR when asked (None: when it is mostly zeros)."""
    if sparse is None:
        sparse = np.count_nonzero(w) < SPARSE_DENSITY * w.size
    return sp.csr_array(w) if sparse else np.ascontiguousarray(w)


@dataclass
class EdgeSet:
    """A weighted directed graph from nodes [src0, src0 + rows) to nodes [dst0, dst0 + cols).

    `weights` None means the complete graph with every weight 1 (the G_s of Eq. 9), stored as
    nothing at all. An edge exists where the weight is non-zero.
    """

    name: str
    shape: tuple[int, int]
    weights: Matrix | None = None
    src0: int = 0
    dst0: int = 0

    @property
    def is_sparse(self) -> bool:
        return isinstance(self.weights, sp.csr_array)

    @property
    def nnz(self) -> int:
        if self.weights is None:
            return self.shape[0] * self.shape[1]
        return self.weights.nnz if self.is_sparse else int(np.count_nonzero(self.weights))

    def push(self, values: np.ndarray) -> np.ndarray:
        """Σ_i W[i, j] · values[i] for every destination j; values (rows,) or (rows, k)."""
        if self.weights is None:
            return np.broadcast_to(values.sum(0), (self.shape[1], *values.shape[1:])).copy()
        if not self.is_sparse and values.ndim == 1:
            active = np.flatnonzero(values)
            if active.size < ACTIVE_SUBSET * values.size:  # few senders fire: skip the silent
                return self.weights[active].T @ values[active]
        return self.weights.T @ values

    def weight(self, i: int, j: int) -> float:
        """W of the edge i → j in global node ids (0.0 when there is no edge)."""
        if self.weights is None:
            return 1.0
        return float(self.weights[i - self.src0, j - self.dst0])

    def edges(self) -> Iterator[tuple[int, int]]:
        """Every edge (i, j), global ids, row by row."""
        if self.weights is None:
            rows, cols = np.indices(self.shape).reshape(2, -1)
        elif self.is_sparse:
            coo = self.weights.tocoo()
            rows, cols = coo.row[coo.data != 0], coo.col[coo.data != 0]
        else:
            rows, cols = np.nonzero(self.weights)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            yield r + self.src0, c + self.dst0

    def dense(self) -> np.ndarray:
        if self.weights is None:
            return np.ones(self.shape)
        return self.weights.toarray() if self.is_sparse else self.weights


@dataclass
class Retention:
    """u(i, j) ∈ (0, 1] of every synapse: σ ← u·σ once per token (round 4l of SPEC §4).

    Stored as None (u = 1, no decay), a per-destination vector (u depends on the key-side neuron
    j only: this is how the per-head damping λ_h of BDH-GPU maps onto edges) or a full matrix with
    the shape of the synapse graph.
    """

    values: np.ndarray | None = None

    def at(self, i: int, j: int) -> float:
        if self.values is None:
            return 1.0
        return float(self.values[j] if self.values.ndim == 1 else self.values[i, j])

    def apply(self, sigma: Synapses) -> None:
        if self.values is None:
            return
        if self.values.ndim == 1:
            sigma.scale_columns(self.values)
        else:
            sigma.scale_edges(self.values)


class Synapses:
    """σ_l: one value per edge of G_s (neurons and sensory neurons → neurons), zero at start.

    σ(i, j) is on the edge from the value side i (a y-neuron, or a sensory neuron at layer 1) to
    the key side j (an x-neuron): the tensor equations' reading of Table 1 (SPEC §4).
    """

    def __init__(self, gs: EdgeSet, dtype: np.dtype) -> None:
        self.gs = gs
        if gs.is_sparse:
            w = gs.weights
            data = np.zeros(w.nnz, dtype)
            self.values: Matrix = sp.csr_array((data, w.indices, w.indptr), w.shape)
            self._rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
        else:
            self.values = np.zeros(gs.shape, dtype)

    def read(self, x: np.ndarray, head_onehot: np.ndarray) -> np.ndarray:
        """Σ_j σ(i, j) x(j), summed separately over the neurons j of each head → (rows, nh)."""
        return self.values @ (x[:, None] * head_onehot)

    def potentiate(self, y: np.ndarray, x: np.ndarray) -> None:
        """σ(i, j) += G_s(i, j) · y(i) · x(j): the Hebbian write of round 4l+1."""
        if self.gs.is_sparse:
            v = self.values
            v.data += self.gs.weights.data * y[self._rows] * x[v.indices]
            return
        rows, cols = np.flatnonzero(y), np.flatnonzero(x)  # only co-active pairs change
        if self.gs.weights is None and rows.size > ACTIVE_SUBSET * y.size:
            _rank1_update(self.values, y, x)  # many co-active pairs: one dense rank-1 update
            return
        block = np.outer(y[rows], x[cols])
        if self.gs.weights is not None:
            block *= self.gs.weights[np.ix_(rows, cols)]
        self.values[np.ix_(rows, cols)] += block

    def add(self, delta: np.ndarray) -> None:
        """σ += G_s ⊙ delta, delta a dense (rows, cols) array (the spiking Hebbian write)."""
        if self.gs.is_sparse:
            self.values.data += self.gs.weights.data * delta[self._rows, self.values.indices]
        elif self.gs.weights is None:
            self.values += delta
        else:
            self.values += self.gs.weights * delta

    def scale_columns(self, u: np.ndarray) -> None:
        if self.gs.is_sparse:
            self.values.data *= u[self.values.indices]
        else:
            self.values *= u[None, :]

    def scale_edges(self, u: np.ndarray) -> None:
        if self.gs.is_sparse:
            self.values.data *= u[self._rows, self.values.indices]
        else:
            self.values *= u

    def dense(self) -> np.ndarray:
        return self.values.toarray() if self.gs.is_sparse else self.values.copy()

    # Per-edge access for the rule-by-rule engine (global ids; the graph starts at node 0).
    def __getitem__(self, ij: tuple[int, int]) -> float:
        return float(self.values[ij])

    def __setitem__(self, ij: tuple[int, int], value: float) -> None:
        self.values[ij] = value


def _rank1_update(values: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
    """values += y xᵀ in place (BLAS ger on the transposed, Fortran-ordered view: no temporary)."""
    if values.flags.c_contiguous and values.dtype in (np.float32, np.float64):
        ger = blas.get_blas_funcs("ger", (values,))
        out = ger(1.0, x.astype(values.dtype), y.astype(values.dtype), a=values.T, overwrite_a=1)
        if np.shares_memory(out, values):
            return
        values[...] = out.T  # pragma: no cover - BLAS declined to work in place
        return
    values += np.outer(y, x)
