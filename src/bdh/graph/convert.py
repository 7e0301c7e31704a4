"""From BDH-GPU weights to the graph model and back (the paper's Observation 4, Eq. 9).

With E_ext = [E | embedding] (D × (n + V)): the decoder columns for neurons and, for the sensory
neurons, the token embeddings that give v_0):

    G_x^e − G_x^i = D_x E_ext      G_y^e − G_y^i = D_y E_ext      G_s = all ones
    read-out  = E_ext lm_head      retention u(i, j) = λ_{head(j)} (BDH-GPU's damping, §6.1)

Every real matrix is its positive part minus its negative part, so each graph splits into an
excitatory and an inhibitory graph with disjoint supports. The graph model then computes exactly
BDH-Normfree with the neuron-space residual and no rotary phases (Eqs. 7–8, `twin_config`).

LayerNorms (`layernorm=True`): LN(z) = C z / √(var z + ε) with C the centring matrix. C is
linear, so it folds into the graphs (E_ext → C E_ext; the embedding columns get their whole
LN); the remaining per-token positive scale is applied by the global gains of
engine.VectorOps.norm_a / norm_y, the only non-local step, and it commutes with every ReLU
threshold. This reproduces BDH-GPU with LayerNorms (and the neuron residual, no RoPE) exactly;
without it the graph is the paper's BDH.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bdh.config import BDHConfig
from bdh.graph.edges import EdgeSet, Layout, Retention, as_storage
from bdh.graph.simulator import GraphBDH

WEIGHT_KEYS = ("encoder", "encoder_v", "decoder", "embed.weight", "lm_head", "attn.freqs")


def twin_config(
    config: BDHConfig, layernorm: bool = False, rope: bool = False, residual: str = "neuron"
) -> BDHConfig:
    """The BDH-GPU configuration that computes the same function as a graph converted with these
    options (the defaults: the paper's BDH, i.e. BDH-Normfree with the Eq. 8 residual, no RoPE)."""
    return config.replace(
        residual=residual, rope=rope, layernorm=layernorm, dropout=0.0, attention="naive"
    )


def weights_of(model: Any = None, state_dict: dict | None = None) -> dict[str, np.ndarray]:
    """The five weight tensors of a BDH model or state dict, as float64 numpy arrays."""
    sd = model.state_dict() if model is not None else dict(state_dict or {})
    sd = {k.removeprefix("_orig_mod."): v for k, v in sd.items()}
    missing = [k for k in WEIGHT_KEYS if k not in sd]
    if missing:
        raise ValueError(f"state dict lacks BDH weight(s): {', '.join(missing)}")
    return {k: sd[k].detach().to(torch.float64).cpu().numpy() for k in WEIGHT_KEYS}


def extended_decoder(w: dict[str, np.ndarray], layernorm: bool) -> np.ndarray:
    """E_extᵀ, (n + V, D): decoder rows for neurons, embedding rows for sensory neurons.

    With LayerNorms the neuron rows are centred over D (LN's C) and each embedding row becomes
    LN(embedding row), which is v_0 of its token exactly.
    """
    dec, emb = w["decoder"], w["embed.weight"]
    if layernorm:
        dec = dec - dec.mean(axis=1, keepdims=True)
        emb = emb - emb.mean(axis=1, keepdims=True)
        emb = emb / np.sqrt((emb**2).mean(axis=1, keepdims=True) + 1e-5)
    return np.concatenate([dec, emb], axis=0)


def heads_to_columns(enc: np.ndarray) -> np.ndarray:
    """(nh, D, N) encoder → (D, n) with neuron h·N + k in column h·N + k (head-major)."""
    nh, D, N = enc.shape
    return enc.transpose(1, 0, 2).reshape(D, nh * N)


def from_tensor(
    model: Any = None,
    *,
    state_dict: dict | None = None,
    config: BDHConfig | None = None,
    layernorm: bool = False,
    rope: bool = False,
    residual: str = "neuron",
    exact: bool = False,
    dtype: Any = np.float64,
    threshold: float = 0.0,
    sparse: bool | None = None,
) -> GraphBDH:
    """Convert a `bdh.BDH` (or its state dict + config) into a graph model.

    The defaults give the paper's BDH: Normfree, the neuron-space residual of Eq. 8, no RoPE.
    layernorm=True keeps BDH-GPU's LayerNorms as global gains; rope=True and
    residual="reference" add the reference code's rotary phases and d-space residual (options
    beyond the paper's BDH, rules.py). exact=True takes all three from the model's config, so the
    graph computes exactly what the model computes. threshold: drop edges with |weight| below it
    (an approximation; makes graphs sparse). sparse: force CSR (True) or dense (False) storage.
    """
    config = config if config is not None else model.config
    if exact:
        layernorm, rope, residual = config.layernorm, config.rope, config.residual
    w = weights_of(model, state_dict)
    n, V = config.n, config.vocab_size
    e_ext = extended_decoder(w, layernorm)  # (n + V, D)

    def split(name: str, W: np.ndarray, src0: int, dst0: int) -> tuple[EdgeSet, EdgeSet]:
        W[np.abs(W) < threshold] = 0.0
        pos, neg = np.maximum(W, 0.0).astype(dtype), np.maximum(-W, 0.0).astype(dtype)
        return (
            EdgeSet(f"{name}_e", W.shape, as_storage(pos, sparse), src0, dst0),
            EdgeSet(f"{name}_i", W.shape, as_storage(neg, sparse), src0, dst0),
        )

    gx_e, gx_i = split("gx", e_ext @ heads_to_columns(w["encoder"]), 0, 0)
    gy_e, gy_i = split("gy", e_ext @ heads_to_columns(w["encoder_v"]), 0, 0)
    out_e, out_i = split("out", e_ext @ w["lm_head"], 0, n + V)
    layout = Layout(n=n, vocab=V, n_head=config.n_head, n_layer=config.n_layer)
    return GraphBDH(
        layout=layout,
        gx_e=gx_e,
        gx_i=gx_i,
        gy_e=gy_e,
        gy_i=gy_i,
        gs=EdgeSet("gs", (n + V, n)),
        out_e=out_e,
        out_i=out_i,
        retention=retention_from_damping(config, dtype),
        norm=e_ext.T.astype(dtype) if layernorm else None,
        freqs=np.tile(w["attn.freqs"].reshape(-1), config.n_head) if rope else None,
        residual=residual,
        meta={"source_config": config.to_dict(), "threshold": threshold},
    )


def retention_from_damping(config: BDHConfig, dtype: Any = np.float64) -> Retention:
    """λ_h of BDH-GPU → u(i, j) = λ_{head(j)}: the state of head h holds the keys of its neurons."""
    lam = config.damping_per_head()
    if lam is None:
        return Retention()
    return Retention(np.repeat(np.asarray(lam, dtype=dtype), config.N))


# ====================================================================== the reverse direction
def reverse_check(graph: GraphBDH, model: Any) -> dict[str, float]:
    """How exactly `graph` is the conversion of `model`: 0.0 everywhere for an exact conversion.

    Reports the largest |(G^e − G^i) − D E_ext| of every graph, the most negative weight, the
    number of edges that are both excitatory and inhibitory, and whether G_s is complete.
    """
    w = weights_of(model)
    e_ext = extended_decoder(w, graph.norm is not None)
    expected = {
        "gx": e_ext @ heads_to_columns(w["encoder"]),
        "gy": e_ext @ heads_to_columns(w["encoder_v"]),
        "out": e_ext @ w["lm_head"],
    }
    report: dict[str, float] = {}
    for name, W in expected.items():
        pos, neg = graph.graph(f"{name}_e").dense(), graph.graph(f"{name}_i").dense()
        report[f"{name}_max_abs_error"] = float(np.abs(pos - neg - W).max())
        report[f"{name}_min_weight"] = float(min(pos.min(), neg.min()))
        report[f"{name}_both_signs"] = float(np.count_nonzero((pos > 0) & (neg > 0)))
    report["gs_complete"] = float(graph.gs.weights is None)
    return report


def to_tensor(graph: GraphBDH, n_embd: int, tol: float = 1e-8) -> Any:
    """A BDH-GPU model (Normfree, neuron residual, no RoPE) computing what `graph` computes.

    Needs G_x and G_y to share a right factor of rank ≤ n_embd: [G_x | G_y]ᵀ = [D_x; D_y] E_ext.
    A truncated SVD recovers D_x, D_y and E_ext up to an invertible D × D change of basis R, which
    cancels in D_x E_ext, D_y E_ext and E lm_head, so the function is unchanged (Normfree only: a
    LayerNorm is not invariant under R). Raises ValueError when no such factorisation exists.
    """
    from bdh.model import BDH  # local import: the graph package does not need torch.nn otherwise

    if not graph.is_bdh:
        raise ValueError("to_tensor needs the paper's BDH: a Normfree graph without options")
    lay, D = graph.layout, n_embd
    if lay.n % D:
        raise ValueError(f"n={lay.n} neurons is not a multiple of n_embd={D}: no BDHConfig fits")
    wx = graph.gx_e.dense() - graph.gx_i.dense()
    wy = graph.gy_e.dense() - graph.gy_i.dense()
    U, S, Vt = np.linalg.svd(np.concatenate([wx, wy], axis=1), full_matrices=False)
    rest = S[D:].max(initial=0.0) / max(S[0], 1e-300)
    if rest > tol:
        raise ValueError(f"G_x, G_y are not of rank ≤ n_embd={D}: relative residual {rest:.2e}")
    e_ext = U[:, :D] * S[:D]  # (n + V, D)
    enc = Vt[:D].reshape(D, 2, lay.n_head, lay.N).transpose(1, 2, 0, 3)  # (2, nh, D, N)
    wout = graph.out_e.dense() - graph.out_i.dense()
    lm_head = np.linalg.lstsq(e_ext, wout, rcond=None)[0]
    config = BDHConfig(
        n_layer=lay.n_layer,
        n_embd=D,
        n_head=lay.n_head,
        mlp_internal_dim_multiplier=lay.n // D,  # N = multiplier · D / nh
        dropout=0.0,
        vocab_size=lay.vocab,
        attention="naive",
        residual="neuron",
        layernorm=False,
        rope=False,
        damping=_damping(graph),
    )
    model = BDH(config).to(torch.float64)
    with torch.no_grad():
        for name, value in (
            ("decoder", e_ext[: lay.n]),
            ("embed.weight", e_ext[lay.n :]),
            ("encoder", enc[0]),
            ("encoder_v", enc[1]),
            ("lm_head", lm_head),
        ):
            model.get_parameter(name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return model.eval()


def _damping(graph: GraphBDH) -> list[float] | None:
    u = graph.retention.values
    if u is None:
        return None
    if u.ndim != 1:
        raise ValueError("to_tensor needs a retention that depends on the head only")
    per_head = u.reshape(graph.layout.n_head, graph.layout.N)
    if not np.all(per_head == per_head[:, :1]):
        raise ValueError("to_tensor needs one retention value per head")
    return [float(v) for v in per_head[:, 0]]
