"""Named activation points: hooks that observe or replace them, and caches that record them.

Names (the same in training, `model(idx)`, `model.step` and `model.generate`; see `bdh.trunk`):

    layers.{l}.v   (B, T, D)       the residual stream entering layer l; layers.0.v = LN(embed)
    layers.{l}.x   (B, nh, T, N)   the neurons after ReLU, as layer l uses them
    layers.{l}.a   (B, nh, T, D)   the attention read, before its LayerNorm
    layers.{l}.y   (B, nh, T, N)   the gated neurons x ⊙ relu(LN(a) D_y), before dropout
    logits         (B, T, V)

With `residual="neuron"` (the paper's Eq. 8) x accumulates over layers: `layers.{l}.x` is the sum
x_{l−1} + relu(v_l D_x) that layer l attends with, and `layers.{l}.v` (l ≥ 1) is the fresh
LN(E y_{l−1}) rather than a residual sum. A replacement of x then carries into later layers.

A hook is `fn(tensor, name)`; it returns None to observe, or a tensor of the same shape that
replaces the activation from there on. Hooks are set on the model only inside the context
managers below and removed on exit, also on error; with none set the model runs as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Union

import torch
from torch import Tensor, nn

from bdh.trunk import POINTS, HookFn, point_names

# Which names to keep: a list of names, a predicate on names, or None for all.
Names = Union[Sequence[str], Callable[[str], bool], None]  # noqa: UP007

_NAME = re.compile(r"layers\.(\d+)\.([vxay])")


def hook_names(model: nn.Module) -> list[str]:
    """Every named activation point of the model, in the order they fire."""
    return point_names(model.config.n_layer)


def check_name(model: nn.Module, name: str) -> str:
    """The name itself, or a one-line ValueError naming what is wrong with it."""
    L = model.config.n_layer
    match = _NAME.fullmatch(name) if isinstance(name, str) else None
    if name == "logits" or (match is not None and int(match.group(1)) < L):
        return name
    raise ValueError(
        f"unknown activation point {name!r}: expected 'layers.{{l}}.{{p}}' with l in 0..{L - 1}"
        f" and p one of {', '.join(POINTS)}, or 'logits'"
    )


def select_names(model: nn.Module, names: Names) -> list[str]:
    """The names a list or predicate selects, checked against the model."""
    if names is None:
        return hook_names(model)
    if callable(names):
        return [n for n in hook_names(model) if names(n)]
    if isinstance(names, str):
        names = [names]
    return [check_name(model, n) for n in names]


# ---------------------------------------------------------------------- the cache
class ActivationCache(Mapping[str, Tensor]):
    """Recorded activations by name; `cache["x", 2]` is `cache["layers.2.x"]`.

    Every call recorded (e.g. tokens fed one by one through `model.step`) adds a piece; reading a
    name concatenates its pieces along the token axis T.
    """

    def __init__(self) -> None:
        self._pieces: dict[str, list[Tensor]] = {}
        self._joined: dict[str, Tensor] = {}

    def add(self, name: str, t: Tensor) -> None:
        self._pieces.setdefault(name, []).append(t)
        self._joined.pop(name, None)

    def __getitem__(self, key: str | tuple[str, int]) -> Tensor:
        name = _key(key)
        if name not in self._pieces:
            kept = ", ".join(self._pieces) or "nothing"
            raise KeyError(f"{name!r} was not recorded (the cache holds {kept})")
        if name not in self._joined:
            pieces = self._pieces[name]
            dim = 1 if name == "logits" or name.endswith(".v") else 2  # the T axis
            shapes = {p.shape[:dim] for p in pieces}
            if len(shapes) > 1:  # e.g. prompts of different lengths, prefilled stream by stream
                raise ValueError(
                    f"{name} was recorded with different batch shapes {sorted(shapes)}: "
                    "record streams of different lengths one at a time"
                )
            self._joined[name] = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)
        return self._joined[name]

    def __contains__(self, key: object) -> bool:
        try:
            return _key(key) in self._pieces  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}: {tuple(self[n].shape)}" for n in self)
        return f"ActivationCache({shapes})"


def _key(key: str | tuple[str, int]) -> str:
    """ "layers.2.x", ("x", 2) or ("logits") → the full name."""
    if isinstance(key, str):
        return key
    if isinstance(key, tuple) and len(key) == 2 and key[0] in POINTS and isinstance(key[1], int):
        return f"layers.{key[1]}.{key[0]}"
    raise TypeError(f"a cache key is a name or a (point, layer) pair like ('x', 2), got {key!r}")


# ---------------------------------------------------------------------- context managers
@contextmanager
def hooks(model: nn.Module, hooks: Iterable[tuple[str, HookFn]]) -> Iterator[nn.Module]:
    """Set hooks [(name, fn), ...] for every `model(...)`, `model.step`, `model.generate` inside.

    They are removed on exit, even on error; hooks set by an enclosing block stay and run first.
    """
    pairs = [(check_name(model, name), fn) for name, fn in hooks]
    for name, fn in pairs:
        if not callable(fn):
            raise TypeError(f"the hook for {name} is not callable: {fn!r}")
    table = model._hooks
    for name, fn in pairs:
        table.setdefault(name, []).append(fn)
    try:
        yield model
    finally:
        for name, fn in pairs:
            fns = table[name]
            del fns[next(i for i, f in enumerate(fns) if f is fn)]
            if not fns:
                del table[name]  # an empty table: the trunk skips every point again


@contextmanager
def capture(
    model: nn.Module,
    names: Names = None,
    to: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Iterator[ActivationCache]:
    """Record the named activations of every call inside into the yielded cache (detached).

    `to` and `dtype` move and cast what is kept (e.g. to="cpu", dtype=torch.float16 to save
    memory); a stream fed piece by piece is concatenated along T.
    """
    cache = ActivationCache()

    def record(t: Tensor, name: str) -> None:
        kept = t.detach().to(device=to, dtype=dtype)
        if kept.data_ptr() == t.data_ptr():
            kept = kept.clone()  # the model may write in place into what it was given
        cache.add(name, kept)

    with _set_hooks(model, [(name, record) for name in select_names(model, names)]):
        yield cache


_set_hooks = hooks  # for the functions whose `hooks` argument hides the context manager


# ---------------------------------------------------------------------- one-call forms
def run_with_cache(
    model: nn.Module,
    idx: Tensor,
    names: Names = None,
    to: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, ActivationCache]:
    """`model(idx)` → (logits, cache of the named activations); the logits are model(idx)'s."""
    with capture(model, names, to, dtype) as cache:
        logits, _ = model(idx)
    return logits, cache


def run_with_hooks(model: nn.Module, idx: Tensor, hooks: Iterable[tuple[str, HookFn]]) -> Tensor:
    """`model(idx)` with hooks [(name, fn), ...] set for this call only → logits (B, T, V)."""
    with _set_hooks(model, hooks):
        logits, _ = model(idx)
    return logits


__all__ = [
    "ActivationCache",
    "Names",
    "capture",
    "check_name",
    "hook_names",
    "hooks",
    "run_with_cache",
    "run_with_hooks",
    "select_names",
]
