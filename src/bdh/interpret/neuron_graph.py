"""The emergent neuron graph of BDH-GPU (paper §5.5, Figs. 9–10), read from the trained weights.

In the graph form of BDH (SPEC §4, Eq. 9) neuron i's output y_i reaches neuron j's input x_j
through G_x = D_x E (and the y-path through G_y = D_y E). With the reference's layout,
E = `decoder` (nh·N, D) and D_x = `encoder` (nh, D, N), so the block from source head b to target
head a is

    G[a, b] = E_b @ D[a]     # (N, N): row i = neuron i of head b, column j = neuron j of head a

Notation: nh heads, N neurons per head, D = n_embd, β the edge threshold, m the number of edges.
A `reference` block holds 2^26 entries, so every block is scanned in row tiles: its histogram,
moments and largest entries are accumulated tile by tile and the N×N matrix never exists whole.
The thresholded graph G_{≥β} keeps the entries ≥ β as directed edges i → j (no self-loops:
a neuron's own entry G[a, a](i, i) is left out). Modularity is Newman's, of the undirected,
unweighted graph, best of several seeded Louvain runs (networkx), as in the paper.

Nothing here changes the model: the functions read weight tensors and return numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

MATRICES = ("x", "y")  # G_x = D_x E (encoder), G_y = D_y E (encoder_v)


# ---------------------------------------------------------------------------- the blocks


@dataclass(frozen=True)
class Factors:
    """The weights G is made of, split by head: E (nh, N, D), D_x and D_y (nh, D, N)."""

    E: Tensor
    Dx: Tensor
    Dy: Tensor

    @property
    def n_head(self) -> int:
        return self.E.shape[0]

    @property
    def N(self) -> int:
        return self.E.shape[1]

    @property
    def D(self) -> int:
        return self.E.shape[2]

    def block(self, which: str, a: int, b: int) -> tuple[Tensor, Tensor]:
        """(A, B) with G_which[a, b] = A @ B: A = E_b (N, D), B = D_which[a] (D, N)."""
        if which not in MATRICES:
            raise ValueError(f"matrix must be one of {MATRICES}, got {which!r}")
        enc = self.Dx if which == "x" else self.Dy
        return self.E[b], enc[a]


def factors_of(model: torch.nn.Module) -> Factors:
    """The factors of a BDH model, detached fp32 copies on the CPU."""
    nh, N = model.config.n_head, model.config.N
    E = model.decoder.detach().float().cpu().view(nh, N, -1)  # head-major rows
    return Factors(
        E.clone(), model.encoder.detach().float().cpu(), model.encoder_v.detach().float().cpu()
    )


def whole(model: torch.nn.Module, which: str) -> tuple[Tensor, Tensor]:
    """(E (n, D), D_which (D, n)): every head pair at once, G_which = E @ D_which.

    Neuron j of head a is column a·N + j; the rows of E are head-major. Detached fp32 copies.
    """
    if which not in MATRICES:
        raise ValueError(f"matrix must be one of {MATRICES}, got {which!r}")
    enc = model.encoder if which == "x" else model.encoder_v  # (nh, D, N)
    return model.decoder.detach().float(), enc.detach().float().transpose(0, 1).flatten(1)


def dense(A: Tensor, B: Tensor) -> Tensor:
    """The whole block at once; for small models and tests."""
    return A @ B


def tiles(A: Tensor, B: Tensor, rows: int = 1024) -> Iterator[tuple[int, Tensor]]:
    """(first row, A[r0:r0+rows] @ B): the block in row tiles of (rows, N)."""
    for r0 in range(0, A.shape[0], rows):
        yield r0, A[r0 : r0 + rows] @ B


def rms(A: Tensor, B: Tensor) -> float:
    """sqrt(mean of (A B)²) without forming A B: ‖A B‖_F² = trace((AᵀA)(B Bᵀ))."""
    A64, B64 = A.double(), B.double()
    fro2 = float(((A64.T @ A64) * (B64 @ B64.T)).sum())
    return math.sqrt(max(fro2, 0.0) / (A.shape[0] * B.shape[1]))


# ---------------------------------------------------------------------------- one scan per block


@dataclass
class Grid:
    """Histogram bins of width h, symmetric about 0: bin k covers [(k−K)h, (k−K+1)h), k < 2K.

    Entries beyond ±K·h are counted in the outermost bins (`clipped` says how many).
    """

    h: float
    K: int

    @property
    def edges(self) -> np.ndarray:
        return np.arange(-self.K, self.K + 1) * self.h


class TopEntries:
    """The `keep` largest entries seen so far, as (row, column, value), merged tile by tile."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.rows: list[Tensor] = []
        self.cols: list[Tensor] = []
        self.vals: list[Tensor] = []
        self.size = 0
        self.floor = -math.inf  # the smallest kept value once `keep` are held

    def add(self, r0: int, tile: Tensor, floor: float = -math.inf) -> None:
        """Take the tile's entries ≥ max(floor, the current floor); `floor` must be a value
        that at least `keep` entries seen so far reach (the caller's histogram gives one)."""
        if self.keep == 0:
            return
        # The smallest finite float as the lowest bar: masked entries (−inf) never enter.
        bar = max(floor, self.floor, torch.finfo(tile.dtype).min)
        flat = torch.nonzero((tile >= bar).flatten()).squeeze(1)
        self.rows.append(flat // tile.shape[1] + r0)
        self.cols.append(flat % tile.shape[1])
        self.vals.append(tile.flatten()[flat])
        self.size += flat.numel()
        if self.size >= 2 * self.keep or len(self.vals) > 64:
            self._prune()

    def _prune(self) -> None:
        r, c, v = torch.cat(self.rows), torch.cat(self.cols), torch.cat(self.vals)
        if v.numel() > self.keep:
            v, idx = torch.topk(v, self.keep)
            r, c = r[idx], c[idx]
        self.rows, self.cols, self.vals, self.size = [r], [c], [v], v.numel()
        if self.size >= self.keep:
            self.floor = float(v.min())

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, columns, values), values descending."""
        if not self.vals:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        self._prune()
        r, c, v = self.rows[0].numpy(), self.cols[0].numpy(), self.vals[0].numpy()
        order = np.argsort(-v, kind="stable")
        return r[order], c[order], v[order]


def _floor_for(counts: Tensor, grid: Grid, need: int, top: bool) -> float:
    """A value that at least `need` entries counted so far reach: the lower edge of the highest
    bin with `need` entries at or above it (top), or the same for −w from the lowest bins."""
    tail = counts.flip(0) if top else counts
    reach = torch.nonzero(torch.cumsum(tail, 0) >= need)
    if reach.numel() == 0:
        return -math.inf
    k = int(reach[0])  # bins counted from the end
    return (grid.K - 1 - k) * grid.h


@dataclass
class BlockScan:
    """What one pass over a block gives: histogram, moments and its largest entries."""

    counts: np.ndarray  # (2K,) int64 on the shared grid
    moments: np.ndarray  # (4,) float64: count, Σw, Σw², Σw³
    top: tuple[np.ndarray, np.ndarray, np.ndarray]  # (i, j, w) of the largest entries, off-diagonal
    bottom: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # of −G, if asked

    @property
    def mean(self) -> float:
        return float(self.moments[1] / self.moments[0])

    @property
    def skew(self) -> float:
        """Sample skewness E[(w−μ)³]/σ³ from the raw moments."""
        n, s1, s2, s3 = self.moments
        mu = s1 / n
        var = s2 / n - mu**2
        third = s3 / n - 3 * mu * s2 / n + 2 * mu**3
        return float(third / var**1.5) if var > 0 else 0.0


def scan(
    A: Tensor,
    B: Tensor,
    grid: Grid,
    keep: int,
    diagonal: bool,
    negatives: bool = False,
    rows: int = 1024,
) -> BlockScan:
    """One pass over G = A @ B in row tiles.

    `diagonal` marks a block from a head to itself, whose (i, i) entries are self-loops and never
    edges (they still count in the histogram). `keep` bounds the edges kept per sign.
    """
    counts = torch.zeros(2 * grid.K, dtype=torch.int64)
    moments = np.zeros(4)
    pos, neg = TopEntries(keep), TopEntries(keep if negatives else 0)
    lo, hi = -grid.K * grid.h, grid.K * grid.h
    # Entries on the diagonal are counted but are never edges: ask the histogram for that many more.
    need = keep + (A.shape[0] if diagonal else 0)
    for r0, t in tiles(A, B, rows):
        clipped = t.clamp(lo, math.nextafter(hi, 0.0))
        counts += torch.histc(clipped, bins=2 * grid.K, min=lo, max=hi).long()
        moments += _moments(t)
        if diagonal:  # a self-loop is never an edge: −inf is below every threshold
            t.diagonal(offset=r0).fill_(-math.inf)
        pos.add(r0, t, _floor_for(counts, grid, need, top=True))
        if negatives:
            t.neg_()
            if diagonal:
                t.diagonal(offset=r0).fill_(-math.inf)
            neg.add(r0, t, _floor_for(counts, grid, need, top=False))
    return BlockScan(counts.numpy(), moments, pos.result(), neg.result() if negatives else None)


def _moments(t: Tensor) -> np.ndarray:
    """count, Σw, Σw², Σw³ of a tile: fp32 sums per row, accumulated in fp64."""
    t2 = t * t
    rows = torch.stack([t.sum(1), t2.sum(1), (t2 * t).sum(1)]).double().sum(1)
    return np.array([t.numel(), *rows.tolist()])


def make_grid(scale: float, bound: float, bins_per_unit: int = 20, max_units: float = 40.0) -> Grid:
    """Bins of width scale/bins_per_unit out to min(bound, max_units·scale)."""
    h = scale / bins_per_unit
    K = max(1, math.ceil(min(bound, max_units * scale) / h))
    return Grid(h, K)


def entry_bound(A: Tensor, B: Tensor) -> float:
    """max |(A B)(i, j)| ≤ max_i ‖A_i‖ · max_j ‖B_:j‖ (Cauchy–Schwarz)."""
    return float(A.norm(dim=1).max() * B.norm(dim=0).max())


# ---------------------------------------------------------------------------- the tail rule


def survival(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each grid edge x_k = k·h, k = 0..K: (#{w ≥ x_k}, #{w < −x_k})."""
    K = counts.size // 2
    upper = np.cumsum(counts[K:][::-1])[::-1]  # bins [x_k, ...) for k = 0..K−1
    lower = np.cumsum(counts[:K])[::-1]  # bins below −x_k, k = 0..K−1
    return np.append(upper, 0), np.append(lower, 0)


def symmetric_part(counts: np.ndarray) -> np.ndarray:
    """min(f(x), f(−x)) bin by bin (the grid is symmetric about 0)."""
    return np.minimum(counts, counts[::-1])


def windows(counts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """For each grid edge x_k = k·h, k = 0..K: the entries in [x_k, x_k + width·h) and in its
    mirror image (−x_k − width·h, −x_k]."""
    up, down = survival(counts)
    shift = np.minimum(np.arange(up.size) + width, up.size - 1)
    return up - up[shift], down - down[shift]


def tail_threshold(
    counts: np.ndarray, grid: Grid, ratio: float = 2.0, min_count: int = 100, width: int = 5
) -> float | None:
    """The β where the positive tail separates from the symmetric part, or None.

    Fig. 9a draws the density f and its symmetric part min(f(x), f(−x)); the tail separates where
    the excess f(x) − f(−x) outgrows the symmetric part, i.e. f(x) ≥ ratio·f(−x) with ratio 2.
    The rule: β is the smallest grid edge x > 0 such that every window [x', x' + width·h) with
    x' ≥ x holding at least `min_count` entries has ratio times the entries of its mirror window.
    Windows of several bins, and skipping those with few entries, keep the rule stable where the
    tail thins out (a handful of outliers is no tail). A histogram with no such edge has none.
    """
    pos, neg = windows(counts, width)
    ok = pos >= ratio * neg
    k = np.nonzero(pos >= min_count)[0]
    k = k[k > 0]
    if k.size == 0 or not ok[k[-1]]:
        return None
    bad = k[~ok[k]]
    first = k[k > bad[-1]][0] if bad.size else k[0]
    return float(first * grid.h)


def excess_above(counts: np.ndarray, grid: Grid, beta: float) -> int:
    """#{w ≥ β} − #{w ≤ −β}: the positive tail's mass beyond its mirror image."""
    up, down = survival(counts)
    k = min(round(beta / grid.h), grid.K)
    return int(up[k] - down[k])


# ---------------------------------------------------------------------------- graphs and baselines


def node_ids(i: np.ndarray, j: np.ndarray, N: int, diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Node numbers of the edges i → j: one node set for a head's own block, else two."""
    return (i, j) if diagonal else (i, j + N)


def gnm_pairs(
    N: int, m: int, diagonal: bool, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """m distinct pairs (i, j) drawn uniformly from the N×N block (i ≠ j in a diagonal block)."""
    pairs = N * (N - 1) if diagonal else N * N
    if m > pairs:
        raise ValueError(f"cannot draw {m} distinct pairs from {pairs}")
    chosen = np.zeros(0, np.int64)
    while chosen.size < m:
        draw = rng.integers(0, N * N, size=int(1.2 * (m - chosen.size)) + 16)
        if diagonal:
            draw = draw[draw // N != draw % N]
        chosen = np.unique(np.concatenate([chosen, draw]))
    chosen = rng.permutation(chosen)[:m]
    return chosen // N, chosen % N


def lowrank_factors(N: int, d: int, seed: int) -> tuple[Tensor, Tensor]:
    """P₁ (N, d), P₂ᵀ (d, N) with entries N(0, 1): the thresholded (P₁P₂ᵀ)_{≥β'} baseline."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, d, generator=g), torch.randn(d, N, generator=g)


@dataclass
class Modularity:
    q: float  # best Newman modularity over the runs
    communities: int  # of the best run
    edges: int  # directed edges given
    undirected_edges: int  # after merging i→j with j→i and dropping self-loops
    nodes: int  # nodes with at least one edge
    runs: list[float] = field(default_factory=list)


def adjacency(u: np.ndarray, v: np.ndarray) -> Any:
    """The symmetric 0/1 adjacency (scipy CSR) of the undirected graph u—v on the nodes that have
    an edge, self-loops dropped."""
    import scipy.sparse as sp

    keep = u != v
    nodes, inverse = np.unique(np.concatenate([u[keep], v[keep]]), return_inverse=True)
    k = int(keep.sum())
    n = nodes.size
    A = sp.coo_matrix((np.ones(2 * k), (inverse, np.roll(inverse, k))), shape=(n, n)).tocsr()
    A.data[:] = 1.0  # i→j and j→i are one undirected edge
    return A


def backends() -> tuple[str, ...]:
    """Louvain implementations available: scikit-network (compiled, the `neuron-graph` extra)
    first when installed, networkx always."""
    try:
        import sknetwork  # noqa: F401
    except ImportError:
        return ("networkx",)
    return ("sknetwork", "networkx")


def modularity(
    u: np.ndarray, v: np.ndarray, runs: int = 5, seed: int = 0, backend: str | None = None
) -> Modularity:
    """Best Newman modularity of `runs` Louvain runs (seeds seed..seed+runs−1) on the undirected,
    unweighted graph u—v. Both backends score partitions with the same formula."""
    backend = backend or backends()[0]
    if backend not in backends():
        raise ValueError(f"Louvain backend must be one of {backends()}, got {backend!r}")
    A = adjacency(u, v)
    undirected = A.nnz // 2
    if undirected == 0:
        return Modularity(0.0, 0, int(u.size), 0, 0, [])
    qs, best = [], 0
    for r in range(runs):
        labels = _louvain(A, seed + r, backend)
        qs.append(newman_modularity(A, labels))
        if qs[-1] >= max(qs):
            best = int(labels.max()) + 1
    return Modularity(max(qs), best, int(u.size), undirected, A.shape[0], qs)


def _louvain(A: Any, seed: int, backend: str) -> np.ndarray:
    """Community labels of every node of A from one seeded Louvain run."""
    if backend == "sknetwork":
        from sknetwork.clustering import Louvain

        return np.asarray(Louvain(shuffle_nodes=True, random_state=seed).fit_predict(A))
    import networkx as nx

    comms = nx.community.louvain_communities(nx.from_scipy_sparse_array(A), seed=seed)
    labels = np.empty(A.shape[0], np.int64)
    for c, members in enumerate(comms):
        labels[list(members)] = c
    return labels


def newman_modularity(A: Any, labels: np.ndarray) -> float:
    """Q = Σ_c [ e_c / m − (d_c / 2m)² ] for a symmetric 0/1 adjacency without self-loops:
    e_c the edges inside community c, d_c its total degree, m the edge count."""
    deg = np.asarray(A.sum(axis=1)).ravel()
    two_m = deg.sum()
    coo = A.tocoo()
    inside = np.bincount(labels[coo.row], weights=(labels[coo.row] == labels[coo.col]))
    d_c = np.bincount(labels, weights=deg)
    return float(inside.sum() / two_m - ((d_c / two_m) ** 2).sum())


# ---------------------------------------------------------------------------- degrees and cores


def degrees(
    edges: list[tuple[int, int, np.ndarray, np.ndarray]], nh: int, N: int
) -> tuple[np.ndarray, np.ndarray]:
    """In- and out-degrees over the whole graph of nh·N neurons, from per-block edges.

    `edges` holds (a, b, i, j): edges from neuron i of head b to neuron j of head a.
    """
    n = nh * N
    din, dout = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for a, b, i, j in edges:
        din += np.bincount(a * N + j, minlength=n)
        dout += np.bincount(b * N + i, minlength=n)
    return din, dout


def powerlaw_fit(degree: np.ndarray) -> dict[str, Any]:
    """Discrete power-law fit of the positive degrees (x_min chosen by the KS distance, Clauset et
    al.), with normalised log-likelihood ratios against a log-normal and an exponential:
    R > 0 favours the power law, p its significance (the `powerlaw` package)."""
    import powerlaw

    data = degree[degree > 0]
    if data.size < 10 or np.unique(data).size < 3:
        return {"n": int(data.size), "alpha": None, "reason": "too few distinct positive degrees"}
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, discrete=True, verbose=False)
        out: dict[str, Any] = {
            "n": int(data.size),
            "alpha": float(fit.power_law.alpha),
            "sigma": float(fit.power_law.sigma),
            "xmin": float(fit.power_law.xmin),
            "n_tail": int((data >= fit.power_law.xmin).sum()),
            "ks_distance": float(fit.power_law.D),
        }
        for alt in ("lognormal", "exponential"):
            R, p = fit.distribution_compare("power_law", alt, normalized_ratio=True)
            out[f"vs_{alt}"] = {"R": float(R), "p": float(p)}
    return out


def core_numbers(u: np.ndarray, v: np.ndarray) -> dict[int, int]:
    """k-core number of every node of the undirected graph u—v (self-loops dropped)."""
    import networkx as nx

    G = nx.Graph()
    G.add_edges_from(zip(u.tolist(), v.tolist(), strict=True))
    G.remove_edges_from(nx.selfloop_edges(G))
    return nx.core_number(G)


def core_summary(u: np.ndarray, v: np.ndarray, core: dict[int, int]) -> dict[str, Any]:
    """How concentrated the graph is: its innermost core's share of nodes and of edge ends."""
    if not core:
        return {"max_core": 0}
    k = max(core.values())
    inner = {node for node, c in core.items() if c == k}
    ends = np.concatenate([u, v])
    in_core = np.isin(ends, np.fromiter(inner, np.int64, len(inner)))
    return {
        "max_core": int(k),
        "core_nodes": len(inner),
        "core_node_share": len(inner) / len(core),
        "core_edge_end_share": float(in_core.mean()),
    }
