"""Two ways to execute the rules of `bdh.graph.rules` on a simulator's state.

- `LocalOps` runs each rule's body one neuron / one edge at a time: the specification, slow, for
  tiny graphs. With `check=True` every variable a body reads or writes is logged through `Tracked`
  and must belong to the neuron it runs at, or to the edge it runs on and that edge's two ends;
  anything else raises `LocalityError` (the paper's locality claim, checked rather than assumed).
- `VectorOps` computes the same rounds with array operations (numpy / scipy.sparse): the fast path,
  tested to agree with `LocalOps`.

Both act on a simulator `sim` with `sim.model` (a `GraphBDH`), `sim.state` (a `NeuronState`) and
`sim.sigma` (one `Synapses` per layer); `apply(name, sim, layer)` runs one rule.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bdh.graph.rules import RULES, Rule

if TYPE_CHECKING:
    from bdh.graph.edges import EdgeSet, Retention

EDGE_VARS = ("sigma", "u", "w")
LN_EPS = 1e-5  # LayerNorm's eps in BDH-GPU (SPEC §2)


@dataclass
class NeuronState:
    """Every neuron's own variables (rules.py docstring); arrays over all nodes of the Layout."""

    X: np.ndarray
    Y: np.ndarray
    Xe: np.ndarray
    Xi: np.ndarray
    Ye: np.ndarray
    Yi: np.ndarray
    A: np.ndarray  # (nh, n_nodes): one compartment per head
    stimulus: np.ndarray
    # Options beyond the paper's BDH (rules.py): RoPE keys and oscillators, the d-space residual.
    K: np.ndarray
    Z: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    clock: np.ndarray

    @classmethod
    def zeros(cls, n_nodes: int, n_head: int, dtype: np.dtype) -> NeuronState:
        vec = [np.zeros(n_nodes, dtype) for _ in range(12)]
        return cls(*vec[:6], np.zeros((n_head, n_nodes), dtype), *vec[6:])


# ====================================================================== the vectorised rounds
class VectorOps:
    """The rounds as array operations; each method is the whole-graph form of one rule body."""

    def apply(self, name: str, sim: Any, layer: int) -> None:
        getattr(self, name)(sim, layer)

    # --- messages a neuron population sends; SpikingOps replaces these by spike estimates
    def emit(self, values: np.ndarray) -> np.ndarray:
        return values

    def emit_and(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return a * b

    # --- neuron rules
    def token_start(self, sim: Any, layer: int) -> None:
        s = sim.state
        s.X[:], s.Xe[:], s.Xi[:] = 0.0, 0.0, 0.0
        s.Y[:] = s.stimulus

    def reset_x_integrators(self, sim: Any, layer: int) -> None:
        sim.state.Xe[:], sim.state.Xi[:] = 0.0, 0.0

    def reset_y(self, sim: Any, layer: int) -> None:
        s = sim.state
        s.Y[:], s.Ye[:], s.Yi[:] = 0.0, 0.0, 0.0

    def reset_a(self, sim: Any, layer: int) -> None:
        sim.state.A[:] = 0.0

    def fire_y(self, sim: Any, layer: int) -> None:
        s, n = sim.state, sim.model.layout.n
        s.Y[:n] = self.emit_and(np.maximum(s.Ye[:n] - s.Yi[:n], 0.0), s.X[:n])

    def fire_x(self, sim: Any, layer: int) -> None:
        s, n = sim.state, sim.model.layout.n
        s.X[:n] += np.maximum(s.Xe[:n] - s.Xi[:n], 0.0)

    def logit(self, sim: Any, layer: int) -> None:
        s, out = sim.state, sim.model.layout.outputs
        s.X[out] = s.Xe[out] - s.Xi[out]

    # --- edge rules on the synapses σ_l (edges of G_s)
    def infer(self, sim: Any, layer: int) -> None:
        lay, xk = sim.model.layout, sim.key_activity()
        sim.state.A[:, : lay.n_src] += sim.sigma[layer].read(self.emit(xk), sim.head_onehot).T

    def decay(self, sim: Any, layer: int) -> None:
        sim.model.retention.apply(sim.sigma[layer])

    def hebb(self, sim: Any, layer: int) -> None:
        lay = sim.model.layout
        sim.sigma[layer].potentiate(sim.state.Y[: lay.n_src], sim.key_activity())

    # --- edge rules on the fixed graphs
    def y_excite(self, sim: Any, layer: int) -> None:
        sim.state.Ye[: sim.model.layout.n] += self._from_compartments(sim, sim.model.gy_e)

    def y_inhibit(self, sim: Any, layer: int) -> None:
        sim.state.Yi[: sim.model.layout.n] += self._from_compartments(sim, sim.model.gy_i)

    def _from_compartments(self, sim: Any, g: EdgeSet) -> np.ndarray:
        """Σ_i W(i, k)·A[head(k), i]: every head's compartment pushed, then k keeps its own."""
        pushed = g.push(self.emit(sim.state.A[:, : g.shape[0]]).T)  # (n, nh)
        return pushed[np.arange(g.shape[1]), sim.model.layout.head()[: g.shape[1]]]

    def x_excite(self, sim: Any, layer: int) -> None:
        _push_into(sim.state.Xe, sim.model.gx_e, self.emit(sim.state.Y))

    def x_inhibit(self, sim: Any, layer: int) -> None:
        _push_into(sim.state.Xi, sim.model.gx_i, self.emit(sim.state.Y))

    def out_excite(self, sim: Any, layer: int) -> None:
        _push_into(sim.state.Xe, sim.model.out_e, self.emit(sim.state.Y))

    def out_inhibit(self, sim: Any, layer: int) -> None:
        _push_into(sim.state.Xi, sim.model.out_i, self.emit(sim.state.Y))

    # --- LayerNorm as a global gain (only for graphs converted with layernorm=True).
    # LN(z) = (z − mean z)/√(var z + ε). The centring is linear and already folded into the
    # graphs (convert.py); what is left is one positive scalar per token, which commutes with the
    # ReLU thresholds. It needs ‖E_c z‖ over all neurons: a global, not a local, quantity.
    def norm_a(self, sim: Any, layer: int) -> None:
        s, norm = sim.state, sim.model.norm
        for h in range(s.A.shape[0]):
            s.A[h, : norm.shape[1]] *= ln_gain(norm @ s.A[h, : norm.shape[1]])

    def norm_y(self, sim: Any, layer: int) -> None:
        s, norm, n = sim.state, sim.model.norm, sim.model.layout.n
        s.Y[:n] *= ln_gain(norm[:, :n] @ s.Y[:n])

    def norm_z(self, sim: Any, layer: int) -> None:
        s, norm = sim.state, sim.model.norm
        s.Z[: norm.shape[1]] *= ln_gain(norm @ s.Z[: norm.shape[1]])

    # --- options beyond the paper's BDH (rules.py): RoPE and the reference's d-space residual
    def oscillate(self, sim: Any, layer: int) -> None:
        s, n = sim.state, sim.model.layout.n
        angle = ((s.clock[:n] * sim.model.freqs) % 1.0) * (2.0 * np.pi)
        s.cos[:n], s.sin[:n] = np.cos(angle), np.sin(angle)
        s.clock[:n] += 1.0

    def key_self(self, sim: Any, layer: int) -> None:
        n = sim.model.layout.n
        sim.state.K[:n] = sim.state.cos[:n] * sim.state.X[:n]

    def key_pair(self, sim: Any, layer: int) -> None:
        s, n = sim.state, sim.model.layout.n
        s.K[:n] += s.sin[:n] * sim.model.pairs.push(s.X[:n])

    def residual_start(self, sim: Any, layer: int) -> None:
        sim.state.Z[:] = sim.state.stimulus

    def residual_add(self, sim: Any, layer: int) -> None:
        sim.state.Z += sim.state.Y

    def emit_z(self, sim: Any, layer: int) -> None:
        sim.state.Y[:] = sim.state.Z

    def reset_x(self, sim: Any, layer: int) -> None:
        sim.state.X[: sim.model.layout.n] = 0.0


def ln_gain(z: np.ndarray) -> float:
    """1/√(var z + ε): the scale LayerNorm applies to a (D,) vector."""
    return float(1.0 / np.sqrt(z.var() + LN_EPS))


def _push_into(target: np.ndarray, g: EdgeSet, values: np.ndarray) -> None:
    target[g.dst0 : g.dst0 + g.shape[1]] += g.push(values[g.src0 : g.src0 + g.shape[0]])


# ====================================================================== the rule-by-rule engine
class LocalityError(AssertionError):
    """A rule touched a variable outside its neuron, or outside its edge and the edge's ends."""


class Tracked:
    """Wraps a variable so that every read and write is logged and checked against the site."""

    def __init__(self, name: str, target: Any, ops: LocalOps) -> None:
        self.name, self.target, self.ops = name, target, ops

    def __getitem__(self, key: Any) -> Any:
        self.ops.record(self.name, key, "read")
        return self.target[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.ops.record(self.name, key, "write")
        self.target[key] = value


class _EdgeValues:
    """Per-edge read access to a fixed graph or retention, by global ids."""

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __getitem__(self, ij: tuple[int, int]) -> float:
        return self.lookup(*ij)


class View:
    """What a rule body sees: the whole state (any index is reachable; locality is checked)."""

    def __init__(self, sim: Any, layer: int, graph: EdgeSet | None, wrap: Any) -> None:
        s, model = sim.state, sim.model
        for name in ("X", "Y", "Xe", "Xi", "Ye", "Yi", "A", "stimulus", "K", "Z", "cos", "sin"):
            setattr(self, name, wrap(name, getattr(s, name)))
        self.clock = wrap("clock", s.clock)
        rope = model.freqs is not None
        self.Xk = wrap("K" if rope else "X", s.K if rope else s.X)  # logged as what it is
        self.head = wrap("head", model.layout.head())
        self.freq = wrap("freq", model.freqs)
        self.n_head = model.layout.n_head
        retention: Retention = model.retention
        self.sigma = wrap("sigma", sim.sigma[layer]) if layer >= 0 else None
        self.u = wrap("u", _EdgeValues(retention.at))
        self.w = None if graph is None else wrap("w", _EdgeValues(graph.weight))


class LocalOps:
    """Runs each rule body once per neuron or per edge; `check=True` enforces locality."""

    def __init__(self, check: bool = False) -> None:
        self.check = check
        self.site: tuple[int, ...] = ()
        self.rule: Rule | None = None
        self.accesses: Counter[tuple[str, str]] = Counter()  # (rule, variable) → count
        self.applied: Counter[str] = Counter()  # rule → times applied

    def apply(self, name: str, sim: Any, layer: int) -> None:
        rule = RULES[name]
        self.rule = rule
        self.applied[name] += 1
        if rule.scope == "global":  # LayerNorm gains: global by nature, see VectorOps
            VectorOps().apply(name, sim, layer)
            return
        graph = sim.model.graph(rule.graph) if rule.scope == "edge" else None
        view = View(sim, layer, graph, self._wrap)
        if graph is not None:
            for i, j in graph.edges():
                self.site = (i, j)
                rule.body(view, i, j)
        else:
            for i in _nodes(sim.model.layout, rule.nodes):
                self.site = (i,)
                rule.body(view, i)

    def _wrap(self, name: str, target: Any) -> Any:
        return Tracked(name, target, self) if self.check else target

    def record(self, name: str, key: Any, mode: str) -> None:
        """Log one access and raise LocalityError if it leaves the current neuron or edge."""
        assert self.rule is not None
        self.accesses[(self.rule.name, name)] += 1
        if name in EDGE_VARS:
            ok = self.rule.scope == "edge" and tuple(key) == self.site
        else:
            node = key[-1] if isinstance(key, tuple) else key
            ok = int(node) in self.site
        if not ok:
            raise LocalityError(
                f"rule {self.rule.name!r} at {self.site} {mode}s {name}[{key}], outside its "
                f"{'edge and its two ends' if self.rule.scope == 'edge' else 'neuron'}"
            )


def _nodes(layout: Any, which: str) -> range:
    if which == "neurons":
        return range(layout.n)
    if which == "outputs":
        return range(layout.outputs.start, layout.outputs.stop)
    return range(layout.n_nodes)
