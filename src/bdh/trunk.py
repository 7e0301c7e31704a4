"""The layer of BDH-GPU (SPEC §2), written once for every way the model is run.

Training, `model(idx)`, prefill and the one-token decoding steps all go through `run` and `layer`
below; what differs between them is only how each product is computed, which an *engine* supplies:

    embed(idx)            token embeddings, before the first LayerNorm
    neurons(v)            relu(v D_x)
    attend(layer, x, v)   the linear attention's read of x over v (state, cache, masked form...)
    scores_y(a)           a D_y, before the ReLU
    decode(y)             E y summed over heads (and dropout in training)
    y_path(x, a)          decode(x ⊙ relu(a D_y)) in one go: sparse rows, fused kernels
    head(v)               the logits

Each engine keeps its own layout (the training engine (B, 1, T, D) and (B, nh, T, N), the
one-token step (B, D) and (B, nh, N)); `single` says the engine has no token axis. The named
activation points (`bdh.interpret`) fire here, so they are the same in every engine, and they
cost one truth test of an empty dict per point when no hook is set.

Named points of layer l: `layers.{l}.v` the residual stream entering the layer (B, T, D),
`layers.{l}.x` the neurons after ReLU (B, nh, T, N), `layers.{l}.a` the attention read before its
LayerNorm (B, nh, T, D), `layers.{l}.y` the gated neurons before dropout (B, nh, T, N); `logits`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.nn.functional as F
from torch import Tensor

# A hook receives (tensor, name) and returns None (observe) or a replacement of the same shape.
HookFn = Callable[[Tensor, str], Any]
# The hooks set on a model: point name → functions, called in order.
Hooks = dict[str, list[HookFn]]

POINTS = ("v", "x", "a", "y")


class Engine(Protocol):
    """The products one way of running the model supplies (see the module docstring)."""

    single: bool

    def embed(self, idx: Tensor) -> Tensor: ...
    def neurons(self, v: Tensor) -> Tensor: ...
    def attend(self, layer: int, x: Tensor, v: Tensor) -> Tensor: ...
    def scores_y(self, a: Tensor) -> Tensor: ...
    def decode(self, y: Tensor) -> Tensor: ...
    def y_path(self, x: Tensor, a: Tensor) -> Tensor: ...
    def head(self, v: Tensor) -> Tensor: ...


def point_names(n_layer: int) -> list[str]:
    """Every named activation point of an n_layer model, in the order they fire."""
    return [f"layers.{l}.{p}" for l in range(n_layer) for p in POINTS] + ["logits"]


def ln(x: Tensor, layernorm: bool) -> Tensor:
    """LayerNorm over D without scale or bias; the identity in BDH-Normfree (Eq. 7)."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-5) if layernorm else x


def gate(x: Tensor, scores: Tensor) -> Tensor:
    """y = x ⊙ relu(a D_y): the y-neurons fire only where x does."""
    return x * scores.relu_()  # in place: the scores are a fresh product


def run(
    engine: Engine, config: Any, idx: Tensor, hooks: Hooks, wrap: Callable | None = None
) -> Tensor:
    """idx → logits through embed, n_layer layers and the head.

    `wrap(layer_step, *args)` runs each layer instead (activation checkpointing in training).
    """
    v = ln(engine.embed(idx), config.layernorm)
    x = None
    for layer in range(config.n_layer):
        if wrap is None:
            x, v = layer_step(engine, config, hooks, layer, v, x)
        else:
            x, v = wrap(layer_step, engine, config, hooks, layer, v, x)
    logits = engine.head(v)
    if hooks:
        logits = fire(hooks, "logits", logits, engine.single)
    return logits


def layer_step(
    engine: Engine, config: Any, hooks: Hooks, layer: int, v: Tensor, x_prev: Tensor | None
) -> tuple[Tensor, Tensor]:
    """One round of the shared weights: (v, x) of layer l−1 → those of layer l (SPEC §2)."""
    named = bool(hooks)
    if named:
        v = fire(hooks, f"layers.{layer}.v", v, engine.single)
    x = engine.neurons(v)
    if config.residual == "neuron" and x_prev is not None:
        x = x_prev + x  # Eq. 8: the residual lives in neuron space
    if named:
        x = fire(hooks, f"layers.{layer}.x", x, engine.single)
    a = engine.attend(layer, x, v)
    if named:
        a = fire(hooks, f"layers.{layer}.a", a, engine.single)
    a = ln(a, config.layernorm)
    if named and f"layers.{layer}.y" in hooks:  # y itself is needed: no fused path
        y = fire(hooks, f"layers.{layer}.y", gate(x, engine.scores_y(a)), engine.single)
        u = engine.decode(y)
    else:
        u = engine.y_path(x, a)
    u = ln(u, config.layernorm)
    if config.residual == "neuron":
        return x, u  # v is the fresh E y
    return x, ln(v + u, config.layernorm)


def fire(hooks: Hooks, name: str, t: Tensor, single: bool) -> Tensor:
    """Call the hooks of `name` on t in its public layout; a returned tensor replaces t."""
    fns = hooks.get(name)
    if not fns:
        return t
    kind = name.rsplit(".", 1)[-1]
    public = _to_public(kind, t, single)
    changed = False
    for fn in fns:
        out = fn(public, name)
        if out is None:
            continue
        if not isinstance(out, Tensor) or out.shape != public.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"hook on {name} returned {got}, expected {tuple(public.shape)}")
        # A copy: the engine may later write in place into what it was given (dropout).
        public, changed = out.to(public.dtype).clone(), True
    return _from_public(kind, public, single) if changed else t


def _to_public(kind: str, t: Tensor, single: bool) -> Tensor:
    """The engine's layout → (B, T, D) for v and logits, (B, nh, T, ·) for x, a, y."""
    if kind == "logits":
        return t
    if kind == "v":
        return t.unsqueeze(1) if single else t[:, 0]
    return t.unsqueeze(2) if single else t


def _from_public(kind: str, t: Tensor, single: bool) -> Tensor:
    if kind == "logits":
        return t
    if kind == "v":
        return t[:, 0] if single else t.unsqueeze(1)
    return t[:, :, 0] if single else t
