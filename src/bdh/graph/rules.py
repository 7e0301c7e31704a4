"""The local rules of BDH (SPEC §4, the paper's §2, Table 1, Eq. 6), one small function each.

These bodies are the specification. Each runs at one neuron `i` (it may touch only i's own
variables) or on one edge `(i, j)` of one graph (it may touch that edge's weight and synapse and the
variables of its two ends). `bdh.graph.engine.LocalOps` runs them one neuron / one edge at a time
and can log every variable they touch (tests/test_graph_locality.py checks the log); `VectorOps`
computes the same rounds with array operations and is tested against the bodies.

Variables a body sees through `s` (see `engine.View`):

    neuron i:  X[i], Y[i]           activity of the x-path (keys/queries) and of the y-path (values)
               Xe[i], Xi[i]         excitatory / inhibitory integrators feeding X (output neurons:
                                    feeding the logit)
               Ye[i], Yi[i]         excitatory / inhibitory integrators feeding Y
               A[h, i]              inference from the state, one compartment per head h: the query
                                    x of head h reaches i through the synapses of head h's neurons
               stimulus[i]          external input (1 at the sensory neuron of the presented token)
               head[i]              static: the head neuron i belongs to (-1 for sensory / output)
               Xk[i]                the activity the synapses see as key / query: X itself, or
                                    with RoPE its rotated form K (options below)
    edge i→j:  w[i, j]              the weight of the graph the rule runs on (G_s, G_x^e, ...)
               sigma[i, j], u[i, j] synapse state σ_l and its retention (edges of G_s)

One token runs TOKEN_START, INPUT, then per layer ROUND_0 .. ROUND_3 (4 rounds, SPEC §4 table; the
last layer's round 3 is replaced by READOUT). Within a round the listed rules run in order; within
one rule the edges (or neurons) are independent, so their order does not matter.

Options beyond the paper's BDH (the end of this file) let a graph compute BDH-GPU exactly as the
reference trains it: RoPE (each neuron an oscillator; a key is rotated with its pair partner along
one extra edge) and the reference's d-space residual (a per-neuron accumulator Z).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Rule:
    """A local rule: where it runs and its body."""

    name: str
    body: Callable[..., None]
    scope: str  # "neuron" (body(s, i)), "edge" (body(s, i, j)) or "global" (LayerNorm only)
    graph: str = ""  # edge rules: which graph's edges ("gs", "gx_e", "gx_i", "gy_e", ...)
    nodes: str = "all"  # neuron rules: "all", "neurons" or "outputs"
    paper: str = ""  # where it comes from


# ------------------------------------------------------------------ edge rules (communication)
def infer(s: Any, i: int, j: int) -> None:
    # Round 4l: A(i) += σ(i, j)·X(j). The query x_{t,l} reads the state written by earlier tokens
    # (read before write: a token never sees itself); Eq. 6's σ_{t-1,l} x_{t,l}.
    s.A[s.head[j], i] += s.sigma[i, j] * s.Xk[j]


def decay(s: Any, i: int, j: int) -> None:
    # Round 4l, after the read: σ ← u·σ (the U of Eq. 6; BDH-GPU's damping λ, paper §6.1).
    s.sigma[i, j] = s.u[i, j] * s.sigma[i, j]


def hebb(s: Any, i: int, j: int) -> None:
    # Round 4l+1: Hebbian potentiation σ(i, j) += G_s(i, j)·Y(i)·X(j) with Y = y_{t,l-1} (values)
    # and X = x_{t,l} (keys): the (y xᵀ) ⊙ G_s of Eq. 6.
    s.sigma[i, j] += s.w[i, j] * s.Y[i] * s.Xk[j]


def y_excite(s: Any, i: int, k: int) -> None:
    # Round 4l+2: Y^e(k) += G_y^e(i, k)·A(i), reading the compartment of k's own head.
    s.Ye[k] += s.w[i, k] * s.A[s.head[k], i]


def y_inhibit(s: Any, i: int, k: int) -> None:
    s.Yi[k] += s.w[i, k] * s.A[s.head[k], i]


def x_excite(s: Any, i: int, j: int) -> None:
    # Round 4l+3: X^e(j) += G_x^e(i, j)·Y(i); also the read-out into the output neurons.
    s.Xe[j] += s.w[i, j] * s.Y[i]


def x_inhibit(s: Any, i: int, j: int) -> None:
    s.Xi[j] += s.w[i, j] * s.Y[i]


# ------------------------------------------------------------------ neuron rules (computation)
def token_start(s: Any, i: int) -> None:
    # A new token: x_{t,0} = 0, and the sensory neuron of the token fires (y_{t,0} = one-hot).
    s.X[i] = 0.0
    s.Xe[i] = 0.0
    s.Xi[i] = 0.0
    s.Y[i] = s.stimulus[i]


def reset_x_integrators(s: Any, i: int) -> None:
    s.Xe[i] = 0.0
    s.Xi[i] = 0.0


def reset_y(s: Any, i: int) -> None:
    s.Y[i] = 0.0
    s.Ye[i] = 0.0
    s.Yi[i] = 0.0


def fire_y(s: Any, k: int) -> None:
    # Round 4l+2: y = (excitation − inhibition)⁺ ⊙ x, Eq. 6's ((G_y^e − G_y^i) σ x)⁺ ⊙ x.
    s.Y[k] = max(s.Ye[k] - s.Yi[k], 0.0) * s.X[k]


def reset_a(s: Any, i: int) -> None:
    for h in range(s.n_head):
        s.A[h, i] = 0.0


def fire_x(s: Any, j: int) -> None:
    # Round 4l+3: integrate-and-fire: x_{t,l+1} = x_{t,l} + (excitation − inhibition)⁺ (Eq. 6).
    s.X[j] += max(s.Xe[j] - s.Xi[j], 0.0)


def logit(s: Any, k: int) -> None:
    # Read-out: the logit is the signed net input (no threshold: the softmax lives outside).
    s.X[k] = s.Xe[k] - s.Xi[k]


# ------------------------------------------------------------------ options beyond the paper
def oscillate(s: Any, i: int) -> None:
    # RoPE (BDH-GPU's rotary phases, SPEC §2): neuron i is an oscillator with its own frequency;
    # at token t its phase is frac(t·freq)·2π. `clock` counts the tokens this neuron has seen.
    angle = ((s.clock[i] * s.freq[i]) % 1.0) * (2.0 * math.pi)
    s.cos[i] = math.cos(angle)
    s.sin[i] = math.sin(angle)
    s.clock[i] += 1.0


def key_self(s: Any, i: int) -> None:
    # RoPE, own half: K(2m) = cos·X(2m) − sin·X(2m+1), K(2m+1) = cos·X(2m+1) + sin·X(2m).
    s.K[i] = s.cos[i] * s.X[i]


def key_pair(s: Any, i: int, j: int) -> None:
    # RoPE, the partner's half, along the pair edge i → j (weight −1 into even j, +1 into odd j).
    s.K[j] += s.w[i, j] * s.sin[j] * s.X[i]


def residual_start(s: Any, i: int) -> None:
    # Reference residual: v_0 = E_ext z_0 with z_0 the token's sensory one-hot.
    s.Z[i] = s.stimulus[i]


def residual_add(s: Any, i: int) -> None:
    # Reference residual in neuron space: v_l = v_{l-1} + E y_l, i.e. z_l = z_{l-1} + y_l; the
    # LayerNorm scales of v_l and of E y_l are global gains (norm_y, norm_z).
    s.Z[i] += s.Y[i]


def emit_z(s: Any, i: int) -> None:
    # What a neuron sends on (values, the x-path, the read-out) is now z_l: Y carries it.
    s.Y[i] = s.Z[i]


def reset_x(s: Any, i: int) -> None:
    # Reference residual: x_{l+1} = relu(D_x v_l) is fresh, not accumulated as in Eq. 8.
    s.X[i] = 0.0


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("token_start", token_start, "neuron", paper="x_{t,0} = 0; y_{t,0} = token"),
        Rule("infer", infer, "edge", "gs", paper="Table 1 round 4l; Eq. 6 σ_{t-1,l} x_{t,l}"),
        Rule("decay", decay, "edge", "gs", paper="Table 1 round 4l; Eq. 6 U; §6.1 damping"),
        Rule("reset_x_integrators", reset_x_integrators, "neuron", paper="Table 1 round 4l"),
        Rule("hebb", hebb, "edge", "gs", paper="Table 1 round 4l+1; Eq. 6 (y xᵀ) ⊙ G_s"),
        Rule("reset_y", reset_y, "neuron", paper="Table 1 round 4l+1"),
        Rule("y_excite", y_excite, "edge", "gy_e", paper="Table 1 round 4l+2; Eq. 6 G_y^e"),
        Rule("y_inhibit", y_inhibit, "edge", "gy_i", paper="Table 1 round 4l+2; Eq. 6 G_y^i"),
        Rule("fire_y", fire_y, "neuron", nodes="neurons", paper="Table 1 round 4l+2; Eq. 6 y"),
        Rule("reset_a", reset_a, "neuron", paper="Table 1 round 4l+2"),
        Rule("x_excite", x_excite, "edge", "gx_e", paper="Table 1 round 4l+3; Eq. 6 G_x^e"),
        Rule("x_inhibit", x_inhibit, "edge", "gx_i", paper="Table 1 round 4l+3; Eq. 6 G_x^i"),
        Rule("fire_x", fire_x, "neuron", nodes="neurons", paper="Table 1 round 4l+3; Eq. 6 x"),
        Rule("out_excite", x_excite, "edge", "out_e", paper="Eq. 7 logits = y_L E lm_head"),
        Rule("out_inhibit", x_inhibit, "edge", "out_i", paper="Eq. 7 logits"),
        Rule("logit", logit, "neuron", nodes="outputs", paper="Eq. 7 logits"),
        # LayerNorm as a global gain (not part of the paper's BDH, which is Normfree): see
        # engine.VectorOps.norm_a / norm_y. They have no local body on purpose.
        Rule("norm_a", lambda s: None, "global", paper="Eq. 8 LN(a) (BDH-GPU only)"),
        Rule("norm_y", lambda s: None, "global", paper="Eq. 8 LN(E y) (BDH-GPU only)"),
        # Options beyond the paper's BDH (BDH-GPU as the reference code trains it).
        Rule("oscillate", oscillate, "neuron", nodes="neurons", paper="SPEC §2 RoPE phases"),
        Rule("key_self", key_self, "neuron", nodes="neurons", paper="SPEC §2 rope_t(x)"),
        Rule("key_pair", key_pair, "edge", "pairs", paper="SPEC §2 rope_t(x)"),
        Rule("residual_start", residual_start, "neuron", paper="SPEC §2 v_0 = LN(embed)"),
        Rule("residual_add", residual_add, "neuron", paper="SPEC §2 v ← LN(v + LN(E y))"),
        Rule("emit_z", emit_z, "neuron", paper="SPEC §2 residual stream"),
        Rule("reset_x", reset_x, "neuron", nodes="neurons", paper="SPEC §2 x = relu(v D_x)"),
        Rule("norm_z", lambda s: None, "global", paper="SPEC §2 LN(v + u) (BDH-GPU only)"),
    )
}

TOKEN_START = ("token_start",)
INPUT = ("x_excite", "x_inhibit", "fire_x")  # sensory y_{t,0} → x_{t,1}: a round 3 of "layer 0"
ROUND_0 = ("infer", "decay", "reset_x_integrators")
ROUND_1 = ("hebb", "reset_y")
ROUND_2 = ("y_excite", "y_inhibit", "fire_y", "reset_a")
ROUND_3 = ("x_excite", "x_inhibit", "fire_x")
READOUT = ("out_excite", "out_inhibit", "logit")
ROPE_KEYS = ("key_self", "key_pair")  # before round 4l: an extra round along the pair edges
# Rules that only the options beyond the paper's BDH use (RoPE, reference residual).
OPTIONS = ("oscillate", "key_self", "key_pair", "residual_start", "residual_add", "emit_z")
OPTIONS += ("reset_x", "norm_z")
