"""Monosemantic synapses (paper §6.3): find the synapse σ(i, j) that separates a concept's sentences
from contrast sentences, then test it on sentences the search never saw.

    found = bdh.interpret.find_concept_synapses(model, concept_ids, contrast_ids, top_k=20)
    best = found.best
    test = bdh.interpret.test_synapse(model, best, held_concept_ids, held_contrast_ids)
    test.u, test.u_opt, test.p, test.r   # one-sided Mann–Whitney U (concept > contrast)

A sentence is a 1-D tensor of token ids read from an empty state. Each synapse of layer l ≥ 1
and head h (σ of `bdh.interpret.synapses`: i over layer l−1's y, all heads; j over head h's x)
gets two values per sentence:

- "end": σ after the sentence's last token;
- "jump": its largest one-token increase σ_t − σ_{t−1} within the sentence (σ_{−1} = 0).

The search scores every synapse of every (layer, head) by the Mann–Whitney U of its "end" value,
built from σ matrices of a block of rows at a time (`synapse_matrices` over a slice of y's
neurons: the rotary factor acts on j only, so a row slice of σ is σ of the row slice), never more
than `block_rows` × N values per sentence. The `candidates` best of each head are then rescored
with both values from their exact trajectories (`synapse_trajectories`); a synapse's score is the
better of its two U. The "jump" value is therefore only searched among the "end" candidates.

Statistics: U counts the (concept, contrast) pairs the synapse orders correctly, ties counting
one half; U_opt = n₁·n₂ is its maximum; r = 2U/U_opt − 1 is the rank-biserial correlation
(1: perfect separation, 0: chance); p is one-sided (concept > contrast), from scipy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from bdh.interpret.synapses import (
    _activations,
    _check_layer_head,
    synapse_matrices,
    synapse_trajectories,
)

FEATURES = ("end", "jump")


# ---------------------------------------------------------------------------- statistics


def u_statistics(pos: np.ndarray | Tensor, neg: np.ndarray | Tensor) -> np.ndarray:
    """Mann–Whitney U of pos (n₁, ...) over neg (n₂, ...) for every column at once.

    U = Σ_a #{b: neg_b < pos_a} + ½·#{b: neg_b = pos_a}, counted per column by binary search
    in the sorted contrast values (exact with ties, O((n₁ + n₂)·log n₂) per column).
    """
    pos_t, neg_t = torch.as_tensor(pos), torch.as_tensor(neg)
    shape = pos_t.shape[1:]
    p = pos_t.reshape(pos_t.shape[0], -1).T.contiguous()  # (columns, n₁)
    q = neg_t.reshape(neg_t.shape[0], -1).T.contiguous().sort(dim=1).values  # (columns, n₂)
    below = torch.searchsorted(q, p, side="left")
    not_above = torch.searchsorted(q, p, side="right")
    u = (below + not_above).sum(1).double() / 2
    return u.reshape(shape).numpy()


@dataclass
class SeparationTest:
    """One-sided Mann–Whitney test that concept values exceed contrast values."""

    u: float
    u_opt: float
    p: float
    r: float  # rank-biserial correlation 2U/U_opt − 1
    n_concept: int
    n_contrast: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def separation(
    pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray
) -> SeparationTest:
    """U, U_opt, one-sided p (concept > contrast) and rank-biserial r of two samples."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if pos.size < 1 or neg.size < 1:
        raise ValueError("a separation test needs at least one concept and one contrast value")
    u = float(u_statistics(pos, neg))
    p = float(stats.mannwhitneyu(pos, neg, alternative="greater").pvalue)
    u_opt = float(pos.size * neg.size)
    return SeparationTest(u, u_opt, p, 2 * u / u_opt - 1, int(pos.size), int(neg.size))


# ---------------------------------------------------------------------------- activations


@dataclass
class _Reading:
    """One sentence read by the model: y of each layer before (T, n) and x per head (nh, T, N)."""

    y_prev: dict[int, Tensor]
    x: dict[int, Tensor]


def _read(model: Any, sentence: Tensor, layers: Sequence[int], dtype: torch.dtype) -> _Reading:
    """One forward pass (eval mode: the caller's) for every layer's y before and x."""
    names = [name for layer in layers for name in (f"layers.{layer - 1}.y", f"layers.{layer}.x")]
    _, cache = model.run_with_cache(sentence[None], names=names, dtype=dtype)
    # the layout of `bdh.interpret.synapses`: y of all heads, head-major (B, T, nh·N)
    y_prev = {layer: cache["y", layer - 1][0].transpose(0, 1).flatten(1) for layer in layers}
    return _Reading(y_prev, {layer: cache["x", layer][0] for layer in layers})


def _rope_damping(model: Any, head: int) -> tuple[Tensor | None, float]:
    freqs = model.attn.freqs.reshape(-1) if model.config.rope else None
    damping = model.config.damping_per_head()
    return freqs, 1.0 if damping is None else float(damping[head])


def _check_sentences(name: str, sentences: Sequence[Tensor], minimum: int = 2) -> list[Tensor]:
    if len(sentences) < minimum:
        raise ValueError(f"{name} needs at least {minimum} sentences, got {len(sentences)}")
    out = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in sentences]
    if any(s.numel() == 0 for s in out):
        raise ValueError(f"{name} holds an empty sentence")
    return out


# ---------------------------------------------------------------------------- values


def synapse_values(
    model: Any,
    sentences: Sequence[Tensor],
    layer: int,
    head: int,
    pairs: Sequence[tuple[int, int]] | Tensor,
    dtype: torch.dtype = torch.float64,
) -> dict[str, np.ndarray]:
    """{"end": (S, P), "jump": (S, P)} for the chosen synapses over each sentence."""
    _check_layer_head(layer, head, model.config.n_layer, model.config.n_head)
    freqs, lam = _rope_damping(model, head)
    out: dict[str, list[np.ndarray]] = {f: [] for f in FEATURES}
    with torch.no_grad():
        for s in _check_sentences("sentences", sentences, minimum=1):
            y_prev, x = _activations(model, s[None], layer, head, dtype)
            traj = synapse_trajectories(y_prev, x, pairs, freqs, lam)[0]  # (T, P)
            for name, value in zip(FEATURES, _features(traj), strict=True):
                out[name].append(value.numpy())
    return {name: np.stack(v) for name, v in out.items()}


def _features(traj: Tensor) -> tuple[Tensor, Tensor]:
    """end value and largest jump of trajectories (T, P)."""
    steps = torch.diff(traj, dim=0, prepend=torch.zeros_like(traj[:1]))
    return traj[-1], steps.max(0).values


# ---------------------------------------------------------------------------- search


@dataclass
class Synapse:
    layer: int
    head: int
    i: int  # neuron of layer−1's y (all heads, head-major)
    j: int  # neuron of head's x
    feature: str  # "end" or "jump": the value that separates best
    u: float  # discovery U of that value
    u_opt: float

    @property
    def auc(self) -> float:
        return self.u / self.u_opt

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "auc": self.auc}


@dataclass
class SearchResult:
    top: list[Synapse]  # best first
    searched: int  # synapses scored
    n_concept: int
    n_contrast: int

    @property
    def best(self) -> Synapse:
        return self.top[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "top": [s.to_dict() for s in self.top],
            "searched": self.searched,
            "n_concept": self.n_concept,
            "n_contrast": self.n_contrast,
        }


@torch.no_grad()
def find_concept_synapses(
    model: Any,
    concept: Sequence[Tensor],
    contrast: Sequence[Tensor],
    *,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    candidates: int = 64,
    block_rows: int = 512,
) -> SearchResult:
    """The top_k synapses whose values separate concept from contrast sentences (concept higher).

    Every synapse of every layer ≥ 1 (or `layers`) and head is scored by the U of its end value;
    each head's `candidates` best are rescored with their largest jump too (see the module).
    """
    concept = _check_sentences("concept", concept)
    contrast = _check_sentences("contrast", contrast)
    config = model.config
    layers = list(range(1, config.n_layer)) if layers is None else list(layers)
    if not layers:
        raise ValueError("the model has one layer: σ needs y of a layer before, so no synapse")
    for layer in layers:
        _check_layer_head(layer, 0, config.n_layer, config.n_head)
    n1 = len(concept)
    was_training = model.training
    model.eval()
    try:
        readings = [_read(model, s, layers, torch.float32) for s in concept + contrast]
        found: list[Synapse] = []
        for layer in layers:
            for head in range(config.n_head):
                pairs = _end_candidates(model, readings, n1, layer, head, candidates, block_rows)
                found += _rescore(model, concept, contrast, layer, head, pairs)
    finally:
        model.train(was_training)
    found.sort(key=lambda s: (-s.u, s.layer, s.head, s.i, s.j))
    searched = len(layers) * config.n_head * config.n * config.N
    return SearchResult(found[:top_k], searched, n1, len(contrast))


def _end_candidates(
    model: Any,
    readings: list[_Reading],
    n1: int,
    layer: int,
    head: int,
    candidates: int,
    block_rows: int,
) -> Tensor:
    """(P, 2) pairs (i, j) of the head with the highest U of their end value, in row blocks."""
    freqs, lam = _rope_damping(model, head)
    n, N = model.config.n, model.config.N
    best_u = torch.full((0,), -1.0, dtype=torch.float64)
    best_pairs = torch.zeros((0, 2), dtype=torch.long)
    for start in range(0, n, block_rows):
        rows = slice(start, min(n, start + block_rows))
        values = torch.stack([_end_block(r, layer, head, rows, freqs, lam) for r in readings])
        u = torch.from_numpy(u_statistics(values[:n1], values[n1:]).reshape(-1))
        flat = torch.arange(u.numel())
        pairs = torch.stack([start + flat // N, flat % N], 1)
        best_u, best_pairs = _keep_best(
            torch.cat([best_u, u]), torch.cat([best_pairs, pairs]), candidates
        )
    return best_pairs


def _end_block(
    reading: _Reading, layer: int, head: int, rows: slice, freqs: Tensor | None, lam: float
) -> Tensor:
    y = reading.y_prev[layer][None, :, rows]
    x = reading.x[layer][head][None]
    return synapse_matrices(y, x, [x.shape[1] - 1], freqs, lam)[0, 0]


def _keep_best(u: Tensor, pairs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    order = torch.argsort(u, descending=True, stable=True)[:k]  # stable: lowest index first on ties
    return u[order], pairs[order]


def _rescore(
    model: Any,
    concept: list[Tensor],
    contrast: list[Tensor],
    layer: int,
    head: int,
    pairs: Tensor,
) -> list[Synapse]:
    pos = synapse_values(model, concept, layer, head, pairs)
    neg = synapse_values(model, contrast, layer, head, pairs)
    u_opt = float(len(concept) * len(contrast))
    out = []
    u = {f: u_statistics(pos[f], neg[f]) for f in FEATURES}
    for p, (i, j) in enumerate(pairs.tolist()):
        feature = max(FEATURES, key=lambda f: u[f][p])  # "end" on a tie
        out.append(Synapse(layer, head, i, j, feature, float(u[feature][p]), u_opt))
    return out


# ---------------------------------------------------------------------------- test


def test_synapse(
    model: Any, synapse: Synapse, concept: Sequence[Tensor], contrast: Sequence[Tensor]
) -> SeparationTest:
    """The synapse's own value (its `feature`) on new sentences: one-sided Mann–Whitney test."""
    pair = [(synapse.i, synapse.j)]
    pos = synapse_values(model, concept, synapse.layer, synapse.head, pair)[synapse.feature]
    neg = synapse_values(model, contrast, synapse.layer, synapse.head, pair)[synapse.feature]
    return separation(pos[:, 0], neg[:, 0])


test_synapse.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


__all__ = [
    "FEATURES",
    "SearchResult",
    "SeparationTest",
    "Synapse",
    "find_concept_synapses",
    "separation",
    "synapse_values",
    "test_synapse",
    "u_statistics",
]
