"""Spiking BDH (the paper's §2.1): every message is carried by Bernoulli spikes.

A neuron with activity a ≥ 0 fires in one trial with probability a / unit, and each spike carries
`unit`, so one trial's message has expectation a. A rule "i, j → k" whose deterministic form is a
product is a stochastic AND: it fires only when both of its independent inputs fire, with
probability p_i·p_j, so its expectation is the product:

    infer   A(i) += σ(i, j)·X(j)      presynaptic spike of X(j) AND synaptic release (prob. σ/unit)
    hebb    σ(i, j) += Y(i)·X(j)      coincidence of a Y(i) spike and an X(j) spike in one trial
    fire_y  Y(k) = (Y^e − Y^i)⁺·X(k)  AND of the dendritic input and the neuron's own X spike
    others  X^e(j) += G(i, j)·Y(i) …  one presynaptic spike, weighted by the synapse's weight

The estimator runs `runs` independent trials of every round and averages them (a neuron
integrates the spikes of its `runs` trials). Each round is then unbiased with variance ∝ 1/runs, so
the whole model converges to the deterministic one with error ∝ 1/√runs (see
tests/test_graph_spiking.py). Averaging whole single-trial runs instead (`average_of_runs`)
tends to E[model], which is not the deterministic model, because the thresholds (ReLU) are not
linear: that bias does not shrink with more runs.

Counts of `runs` independent Bernoulli trials are drawn as binomials, so a round costs the same for
any `runs`, except the Hebbian coincidences, which need the trial-by-trial raster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bdh.graph.engine import VectorOps
from bdh.graph.simulator import GraphBDH, Simulator, Trace


def _unit(values: np.ndarray) -> float:
    """What one spike carries: the largest activity, so every firing probability is ≤ 1."""
    top = float(values.max(initial=0.0))
    if float(values.min(initial=0.0)) < 0.0:
        raise ValueError("spikes carry non-negative activity only; got a negative value")
    return top if top > 0.0 else 1.0


class SpikingOps(VectorOps):
    """VectorOps whose messages are averages of `runs` independent Bernoulli spike trials."""

    def __init__(self, runs: int, rng: np.random.Generator | int | None = None) -> None:
        if not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs must be a positive integer, got {runs!r}")
        self.runs = runs
        self.rng = np.random.default_rng(rng)

    def _count(self, p: np.ndarray, trials: Any = None) -> np.ndarray:
        n = self.runs if trials is None else trials
        return self.rng.binomial(n, np.clip(p, 0.0, 1.0)).astype(p.dtype)

    def emit(self, values: np.ndarray) -> np.ndarray:
        unit = _unit(values)
        return unit * self._count(values / unit) / self.runs

    def emit_and(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ua, ub = _unit(a), _unit(b)
        return ua * ub * self._count((a / ua) * (b / ub)) / self.runs

    def infer(self, sim: Any, layer: int) -> None:
        """A(i) += σ(i, j)·X(j): X(j) spikes, and each spike releases σ(i, j)'s vesicle."""
        s, lay = sim.state, sim.model.layout
        x = s.X[: lay.n]
        sigma = sim.sigma[layer].dense()
        ux, us = _unit(x), _unit(sigma)
        fired = self._count(x / ux)  # (n,) trials in which j fired
        released = self._count(sigma / us, fired[None, :].astype(np.int64))  # AND per trial
        s.A[:, : lay.n_src] += (ux * us / self.runs) * (released @ sim.head_onehot).T

    def hebb(self, sim: Any, layer: int) -> None:
        """σ(i, j) += G_s(i, j)·Y(i)·X(j): count the trials where Y(i) and X(j) both spike."""
        s, lay = sim.state, sim.model.layout
        y, x = s.Y[: lay.n_src], s.X[: lay.n]
        rows, cols = np.flatnonzero(y), np.flatnonzero(x)
        if rows.size == 0 or cols.size == 0:
            return
        uy, ux = _unit(y), _unit(x)
        spikes_y = self.rng.random((rows.size, self.runs)) < (y[rows] / uy)[:, None]
        spikes_x = self.rng.random((cols.size, self.runs)) < (x[cols] / ux)[:, None]
        # Coincidences; float32 counts are exact up to 2^24 trials.
        both = (spikes_y.astype(np.float32) @ spikes_x.T.astype(np.float32)).astype(y.dtype)
        coincidence = np.zeros((lay.n_src, lay.n), y.dtype)
        coincidence[np.ix_(rows, cols)] = (uy * ux / self.runs) * both
        sim.sigma[layer].add(coincidence)


def spiking_run(
    graph: GraphBDH, tokens: Sequence[int], runs: int, seed: int | None = None, sigma: str = "none"
) -> Trace:
    """One stream with every round estimated from `runs` spike trials."""
    return Simulator(graph, SpikingOps(runs, seed)).run(tokens, sigma=sigma)


def measure_convergence(
    graph: GraphBDH,
    tokens: Sequence[int],
    runs: Sequence[int],
    repeats: int = 4,
    seed: int = 0,
) -> dict[int, float]:
    """runs → RMS error of the spiking logits against the deterministic ones, relative to the
    RMS of the deterministic logits, averaged over `repeats` independent seeds."""
    exact = graph.run(tokens, sigma="none").logits
    scale = float(np.sqrt((exact**2).mean()))
    out: dict[int, float] = {}
    for r in runs:
        errs = [
            np.sqrt(((spiking_run(graph, tokens, r, seed + 1000 * k).logits - exact) ** 2).mean())
            for k in range(repeats)
        ]
        out[r] = float(np.sqrt(np.mean(np.square(errs))) / scale)
    return out


def average_of_runs(
    graph: GraphBDH, tokens: Sequence[int], repeats: int, runs: int = 1, seed: int = 0
) -> np.ndarray:
    """The mean logits of `repeats` whole independent spiking runs (biased: thresholds are not
    linear, so this tends to E[logits], not the deterministic logits)."""
    return np.mean(
        [spiking_run(graph, tokens, runs, seed + k).logits for k in range(repeats)], axis=0
    )


def slope(errors: dict[int, float]) -> float:
    """Least-squares slope of log(error) against log(runs); −0.5 is the 1/√runs law."""
    r = np.log(np.asarray(list(errors), dtype=float))
    e = np.log(np.asarray(list(errors.values())))
    return float(np.polyfit(r, e, 1)[0])
