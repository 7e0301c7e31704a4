"""BDH, the graph model (SPEC §4): parameters, the token loop over rounds, and per-layer traces.

`GraphBDH` holds the five graphs of the paper (G_x^e, G_x^i, G_y^e, G_y^i, G_s), the retention u of
every synapse, and the sensory / read-out edges that connect the neurons to token ids. Calling it is
like calling `bdh.BDH`: token ids (B, T) in, `(logits (B, T, V), loss)` out. `Simulator` runs one
stream and keeps its state: the neuron variables and one synapse state σ_l per layer.

One token (rules.py): TOKEN_START, INPUT, then for l = 1..L: ROUND_0 .. ROUND_3 (the last layer
ends with READOUT instead of ROUND_3): 4 rounds per layer, 4L per token, plus input and read-out.
The options beyond the paper's BDH add their rules at the marked places in `Simulator.step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from bdh.graph import rules
from bdh.graph.edges import EdgeSet, Layout, Retention, Synapses
from bdh.graph.engine import LocalOps, NeuronState, VectorOps


@dataclass
class GraphBDH:
    """The parameters of a graph model. W[i, j] of every EdgeSet is the weight of edge i → j.

    gx_e, gx_i, gy_e, gy_i: (n + V) × n, from neurons and sensory neurons to neurons.
    gs: the synapse graph, same shape (None weights = complete, Eq. 9).
    out_e, out_i: (n + V) × V, from neurons and sensory neurons to output neurons.
    norm: None for BDH (Normfree, Eq. 7); for a model converted with LayerNorms, the centred
    E_ext (D × (n + V)) that the global LN gains are computed with (engine.VectorOps.norm_a).
    """

    layout: Layout
    gx_e: EdgeSet
    gx_i: EdgeSet
    gy_e: EdgeSet
    gy_i: EdgeSet
    gs: EdgeSet
    out_e: EdgeSet
    out_i: EdgeSet
    retention: Retention = field(default_factory=Retention)
    norm: np.ndarray | None = None
    # Options beyond the paper's BDH (rules.py): per-neuron RoPE frequencies (turns per token)
    # and the residual ("neuron": Eq. 8; "reference": BDH-GPU's d-space residual).
    freqs: np.ndarray | None = None
    residual: str = "neuron"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.residual not in ("neuron", "reference"):
            raise ValueError(f"residual must be 'neuron' or 'reference', got {self.residual!r}")
        self.pairs = pair_edges(self.layout.n, self.dtype) if self.freqs is not None else None

    @property
    def is_bdh(self) -> bool:
        """True for the paper's BDH: no LayerNorm gains, no RoPE, the neuron-space residual."""
        return self.norm is None and self.freqs is None and self.residual == "neuron"

    @property
    def dtype(self) -> np.dtype:
        w = self.gx_e.weights
        return np.dtype(np.float64) if w is None else w.dtype

    def graph(self, name: str) -> EdgeSet:
        return getattr(self, name)

    def simulator(self, ops: Any = None) -> Simulator:
        return Simulator(self, ops)

    def __call__(self, idx: Any, targets: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids → logits (B, T, V) (float64) and the cross-entropy if targets."""
        ids = _as_ids(idx, self.layout.vocab)
        logits = torch.stack(
            [torch.from_numpy(self.run(row, sigma="none").logits.astype(np.float64)) for row in ids]
        )
        if targets is None:
            return logits, None
        tgt = torch.as_tensor(np.asarray(targets)).long()
        loss = F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-1)
        return logits, loss

    def run(self, tokens: Sequence[int], sigma: str = "final", ops: Any = None) -> Trace:
        """One stream from an empty state; the trace of x, y (every layer, token) and σ."""
        return Simulator(self, ops).run(tokens, sigma=sigma)


@dataclass
class Trace:
    """What a run saw. x, y: (L, T, n), x_l and y_l of Eq. 6 per layer and token; logits (T, V).

    sigma: (L, n + V, n) after the last token ("final"), (T, L, n + V, n) after every token
    ("every"), or None ("none"); σ_l(i, j) is on the edge value-side i → key-side j.
    """

    x: np.ndarray
    y: np.ndarray
    logits: np.ndarray
    sigma: np.ndarray | None = None


class Simulator:
    """One stream: neuron state + σ per layer, advanced token by token through the rounds."""

    def __init__(self, model: GraphBDH, ops: Any = None) -> None:
        self.model = model
        self.ops = VectorOps() if ops is None else ops
        lay = model.layout
        self.state = NeuronState.zeros(lay.n_nodes, lay.n_head, model.dtype)
        self.sigma = [Synapses(model.gs, model.dtype) for _ in range(lay.n_layer)]
        self.head_onehot = lay.head_onehot(model.dtype)

    def _round(self, names: Sequence[str], layer: int) -> None:
        for name in names:
            self.ops.apply(name, self, layer)

    def step(self, token: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feed one token; returns x (L, n), y (L, n) of this token and its logits (V,)."""
        m, s = self.model, self.state
        lay = m.layout
        s.stimulus[:] = 0.0
        s.stimulus[lay.n + token] = 1.0  # the sensory neuron of this token
        self._round(rules.TOKEN_START, -1)
        self._round(("oscillate",) if m.freqs is not None else (), -1)
        self._round(("residual_start",) if m.residual == "reference" else (), -1)
        self._round(rules.INPUT, -1)
        xs, ys = np.zeros((2, lay.n_layer, lay.n), m.dtype)
        for layer in range(lay.n_layer):
            xs[layer] = s.X[: lay.n]  # x_{t,l}
            ys[layer] = self._layer(layer)  # y_{t,l}
        return xs, ys, s.X[lay.outputs].copy()

    def _layer(self, layer: int) -> np.ndarray:
        """Rounds 4l .. 4l+3 of one layer (READOUT after the last); returns y_{t,l}."""
        m, s = self.model, self.state
        ln, ref = m.norm is not None, m.residual == "reference"
        self._round(rules.ROPE_KEYS if m.freqs is not None else (), layer)
        self._round(rules.ROUND_0, layer)
        self._round(rules.ROUND_1, layer)
        self._round(("norm_a",) if ln else (), layer)
        self._round(rules.ROUND_2, layer)
        y = s.Y[: m.layout.n].copy()
        self._round(("norm_y",) if ln else (), layer)
        if ref:  # z_l = LN(z_{l-1} + LN(y_l)), then sent on as Y
            self._round(("residual_add", "norm_z") if ln else ("residual_add",), layer)
            self._round(("emit_z",), layer)
        if layer == m.layout.n_layer - 1:
            self._round(rules.READOUT, -1)
        else:
            self._round(("reset_x",) if ref else (), layer)
            self._round(rules.ROUND_3, layer)
        return y

    def key_activity(self) -> np.ndarray:
        """What the synapses see as keys and queries: x, or its rotation with RoPE."""
        n = self.model.layout.n
        return self.state.K[:n] if self.model.freqs is not None else self.state.X[:n]

    def run(self, tokens: Sequence[int], sigma: str = "final") -> Trace:
        """Feed every token; σ after the last token ("final"), after each ("every") or "none"."""
        if sigma not in ("final", "every", "none"):
            raise ValueError(f"sigma must be 'final', 'every' or 'none', got {sigma!r}")
        xs, ys, logits, sigmas = [], [], [], []
        for token in tokens:
            x, y, lg = self.step(int(token))
            xs.append(x)
            ys.append(y)
            logits.append(lg)
            if sigma == "every":
                sigmas.append(self.sigma_dense())
        if sigma == "final":
            sigmas = self.sigma_dense()
        return Trace(
            x=np.stack(xs, axis=1),
            y=np.stack(ys, axis=1),
            logits=np.stack(logits),
            sigma=None if sigma == "none" else np.asarray(sigmas),
        )

    def sigma_dense(self) -> np.ndarray:
        """(L, n + V, n): every layer's synapse state as a dense matrix."""
        return np.stack([s.dense() for s in self.sigma])


def pair_edges(n: int, dtype: np.dtype) -> EdgeSet:
    """RoPE's pair graph: 2m+1 → 2m with weight −1 and 2m → 2m+1 with weight +1 (SPEC §2)."""
    j = np.arange(n)
    w = sp.csr_array((np.where(j % 2 == 0, -1.0, 1.0).astype(dtype), (j ^ 1, j)), shape=(n, n))
    return EdgeSet("pairs", (n, n), w)


def local_simulator(model: GraphBDH, check: bool = False) -> Simulator:
    """A simulator that runs the rule bodies one neuron / edge at a time (tiny graphs only)."""
    return Simulator(model, LocalOps(check=check))


def _as_ids(idx: Any, vocab: int) -> np.ndarray:
    ids = np.asarray(idx.detach().cpu() if isinstance(idx, torch.Tensor) else idx)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"idx must be a (B, T) array of token ids, got shape {ids.shape}")
    if ids.size == 0:
        raise ValueError("idx is empty: need at least one token")
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab})")
    return ids
