"""The tensor side of the equivalence: BDH-GPU's Eq. 8 (neuron residual, no RoPE) with traces.

Notation: T tokens, nh heads, N neurons per head, n = nh·N, D = n_embd, V vocabulary, L layers.

`tensor_trace` runs, from a `bdh.BDH`'s weights and in float64, the equations that `bdh.BDH`
computes with `twin_config` (residual="neuron", rope=False, layernorm on or off):

    v_0 = LN(embed(idx)),  x_0 = 0
    x_l = x_{l-1} + relu(v_{l-1} D_x)                      # (T, nh, N)
    a_t = x_tᵀ S_{t-1};  S_t = λ S_{t-1} + x_t ⊗ v_{l-1,t}  # per head; read before write
    y_l = relu(LN(a) D_y) ⊙ x_l                            # (T, nh, N)
    v_l = LN(y_l E)                                        # (T, D)
    logits = v_L lm_head

It works in D-space like BDH-GPU (the state is S, N × D per head) and, alongside, builds the
neuron-space synapse state of Eq. 6, σ_l = Σ_τ λ^{t−τ} z_τ x_τᵀ, where z is the neuron-space value
(the token's sensory one-hot for l = 1, LN's gain · y_{l-1} after). ρ = E σ ties the two: the
tests check S_h = σ[:, head h]ᵀ E_ext, and this trace against `bdh.BDH`'s logits and the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bdh.config import BDHConfig
from bdh.graph.convert import weights_of
from bdh.graph.engine import LN_EPS
from bdh.graph.simulator import Trace


@dataclass
class TensorTrace(Trace):
    """simulator.Trace's x, y, logits, sigma, plus S: (L, nh, N, D) after the last token."""

    S: np.ndarray | None = None


def _ln(z: np.ndarray, on: bool) -> np.ndarray:
    if not on:
        return z
    mu = z.mean(-1, keepdims=True)
    return (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + LN_EPS)


def tensor_trace(
    model: Any = None,
    tokens: Sequence[int] = (),
    *,
    state_dict: dict | None = None,
    config: BDHConfig | None = None,
    layernorm: bool | None = None,
    sigma: str = "final",
) -> TensorTrace:
    """Run Eq. 8 on one stream of token ids; layernorm None follows the config."""
    config = config if config is not None else model.config
    ln = config.layernorm if layernorm is None else layernorm
    w = weights_of(model, state_dict)
    nh, N, n, V = config.n_head, config.N, config.n, config.vocab_size
    lam = np.asarray(config.damping_per_head() or [1.0] * nh)
    ids = np.asarray(tokens, dtype=np.int64)
    T = len(ids)

    v = _ln(w["embed.weight"][ids], ln)  # (T, D) v_0
    z = np.zeros((T, n + V))
    z[np.arange(T), n + ids] = 1.0  # the sensory neuron of each token carries v_0
    x = np.zeros((T, nh, N))
    xs, ys, Ss, sigmas = [], [], [], []
    for _ in range(config.n_layer):
        x = x + np.maximum(np.einsum("td,hdn->thn", v, w["encoder"]), 0.0)
        a, S, sig = _attend(x, v, z, lam, sigma)
        y = np.maximum(np.einsum("thd,hdn->thn", _ln(a, ln), w["encoder_v"]), 0.0) * x
        u = y.reshape(T, n) @ w["decoder"]  # (T, D), heads concatenated head-major
        v = _ln(u, ln)
        gain = 1.0 / np.sqrt(u.var(-1, keepdims=True) + LN_EPS) if ln else 1.0
        z = np.concatenate([gain * y.reshape(T, n), np.zeros((T, V))], axis=1)
        xs.append(x.reshape(T, n))
        ys.append(y.reshape(T, n))
        Ss.append(S)
        sigmas.append(sig)
    return TensorTrace(
        x=np.stack(xs),
        y=np.stack(ys),
        logits=v @ w["lm_head"],
        sigma=_stack_sigma(sigmas, sigma),
        S=np.stack(Ss),
    )


def _attend(
    x: np.ndarray, v: np.ndarray, z: np.ndarray, lam: np.ndarray, sigma: str
) -> tuple[np.ndarray, np.ndarray, Any]:
    """The token loop of SPEC §3 on S (nh, N, D), and σ (n + V, n) built the same way."""
    T, nh, N = x.shape
    S = np.zeros((nh, N, v.shape[1]))
    sig = np.zeros((z.shape[1], nh * N)) if sigma != "none" else None
    u = np.repeat(lam, N)  # retention of σ(i, j) is λ of j's head
    a, every = np.zeros((T, nh, v.shape[1])), []
    for t in range(T):
        a[t] = np.einsum("hn,hnd->hd", x[t], S)  # read ...
        S = lam[:, None, None] * S + x[t][:, :, None] * v[t][None, None, :]  # ... then write
        if sig is not None:
            sig = sig * u[None, :] + np.outer(z[t], x[t].reshape(-1))
            if sigma == "every":
                every.append(sig.copy())
    return a, S, (np.stack(every) if sigma == "every" else sig)


def _stack_sigma(per_layer: list[Any], mode: str) -> np.ndarray | None:
    if mode == "none":
        return None
    if mode == "every":  # per layer (T, ...) → (T, L, ...) like simulator.Trace
        return np.stack(per_layer, axis=1)
    return np.stack(per_layer)
